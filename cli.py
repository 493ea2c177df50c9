"""kdpipe's command line: parse flags -> build a config -> call one pipeline function -> print.

The only module that prints for the user; pipeline code raises KdpipeError, which becomes a one-line
`error:` message and exit status 1.
"""

from __future__ import annotations

import contextlib
import json
import os
from fractions import Fraction
from pathlib import Path
from typing import Optional

os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402
from rich.table import Table  # noqa: E402

from kdpipe.errors import KdpipeError  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Knowledge distillation for image classifiers with cached teacher logits.")
console = Console()


@app.callback()
def _quiet_libraries():
    """Library progress bars and advisories would bury kdpipe's own output; errors still show."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity(datasets.utils.logging.CRITICAL)  # its errors reach us as exceptions
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

err_console = Console(stderr=True)


@contextlib.contextmanager
def user_errors():
    """Turn KdpipeError into a one-line message and exit 1; anything else is a bug and keeps its traceback."""
    try:
        yield
    except KdpipeError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]: nothing half-written was left under a final name")
        raise typer.Exit(130) from None


def _splits(text: Optional[str]) -> Optional[list[str]]:
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console, transient=False)


def _bars(bar: Progress):
    """The pipeline's progress callback, `(task, done, total, info="")`, drawn as one bar per task."""
    tasks = {}

    def update(task: str, done: int, total: int, info: str = "") -> None:
        if task not in tasks:
            tasks[task] = bar.add_task(task, total=total, info="")
        bar.update(tasks[task], completed=done, total=total, info=info)

    def clear() -> None:
        for t in tasks.values():
            bar.remove_task(t)
        tasks.clear()

    update.clear = clear
    return update


def _pair(text: str, flag: str) -> tuple[float, float]:
    """Two numbers, each a decimal or a fraction ("3/4,4/3" is exactly the library's default ratio range)."""
    try:
        lo, hi = (float(Fraction(x.strip())) for x in text.split(","))
    except (ValueError, ZeroDivisionError):
        raise KdpipeError(f"{flag} takes two numbers, e.g. 0.25,1 or 3/4,4/3 (got {text!r})") from None
    return lo, hi


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


@app.command("cache-teacher")
def cache_teacher_cmd(
    teacher: str = typer.Option("merve/beans-vit-224", help="Hub id or local save_pretrained folder."),
    revision: Optional[str] = typer.Option(None, help="Hub branch, tag or commit of the teacher."),
    dataset: str = typer.Option("beans", help="Hub id, image folder (split/class/*.jpg) or Parquet/Arrow."),
    dataset_revision: Optional[str] = typer.Option(None, help="Hub revision of the dataset."),
    splits: Optional[str] = typer.Option(None, help="Comma-separated splits.", show_default="every split"),
    image_column: Optional[str] = typer.Option(None, help="Image column.", show_default="image or img"),
    label_column: Optional[str] = typer.Option(None, help="Label column.", show_default="label or labels"),
    out: Optional[Path] = typer.Option(None, help="Output folder.", show_default="data/cache/<teacher>/<dataset>"),
    batch_size: int = typer.Option(32, help="Teacher batch size."),
    precision: str = typer.Option("auto", help="auto|fp32|bf16|fp16 (auto: bf16 where fast, else fp32)."),
    device: str = typer.Option("auto", help="auto|cpu|cuda."),
    workers: Optional[int] = typer.Option(None, help="Decoding workers.", show_default="one per spare core"),
    force: bool = typer.Option(False, "--force", help="Rebuild even if a valid cache exists."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the teacher repo's code."),
    topk: Optional[int] = typer.Option(None, help="Store only the K largest logits per image (+ logsumexp).", show_default="all"),
    topk_dtype: str = typer.Option("float32", help="float32|float16 for the top-K values."),
    views: int = typer.Option(0, help="K random augmented views per image of --view-splits, besides the image itself."),
    view_splits: str = typer.Option("train", help="Comma-separated splits that get views (evaluation splits should not)."),
    view_scale: str = typer.Option("0.25,1", help="Random-resized-crop area range, as fractions of the image."),
    view_ratio: str = typer.Option("3/4,4/3", help="Random-resized-crop aspect-ratio range (width / height)."),
    view_flip: float = typer.Option(0.5, help="Probability of a horizontal flip per view."),
    view_seed: int = typer.Option(0, help="Seed of the views (a view is a function of seed, image id, index)."),
    view_mixup: float = typer.Option(0.0, help="Blend views with another image's view, share ~ Beta(a, a), before the teacher sees them (0 = off)."),
    view_mixup_p: float = typer.Option(0.5, help="With --view-mixup: probability that an augmented view is blended."),
):
    """Run the teacher once over every split and write its raw logits to Parquet."""
    from kdpipe import cache_teacher
    from kdpipe.config import CacheConfig
    from kdpipe.views import ViewPolicy

    with user_errors():
        policy = ViewPolicy(scale=_pair(view_scale, "--view-scale"), ratio=_pair(view_ratio, "--view-ratio"),
                            flip=view_flip, seed=view_seed, mixup=view_mixup, mixup_p=view_mixup_p)
        cfg = CacheConfig(teacher=teacher, revision=revision, dataset=dataset, dataset_revision=dataset_revision,
                          splits=_splits(splits), image_column=image_column, label_column=label_column, out=out,
                          batch_size=batch_size, precision=precision, device=device, workers=workers, force=force,
                          trust_remote_code=trust_remote_code, topk=topk, topk_dtype=topk_dtype, views=views,
                          view_splits=_splits(view_splits) or [], augment=policy)
        from kdpipe.runtime import distributed

        if distributed()[0] > 0:  # under torchrun: rank 0 alone reports
            cache_teacher.run(cfg)
            return
        with _progress() as bar:
            reports = cache_teacher.run(cfg, progress=_bars(bar))
    table = Table(title=f"teacher logits in {cfg.out_dir()}")
    for col in ("split", "rows", "teacher acc", "images/s", "seconds", "file size", ""):
        table.add_column(col, justify="right" if col not in ("split", "") else "left")
    for r in reports:
        done = "written" + (f" (resumed: {r.resumed_images} images from an interrupted run)" if r.resumed_images else "")
        table.add_row(r.split, str(r.rows), f"{r.accuracy:.2%}", "-" if r.reused else f"{r.images_per_s:.1f}",
                      "-" if r.reused or r.seconds is None else f"{r.seconds:.1f}", _human_bytes(r.bytes),
                      "reused (same inputs; --force rebuilds)" if r.reused else done)
    console.print(table)
    if all(r.reused for r in reports):
        console.print("valid cache found for these inputs: nothing to do")


@app.command("inspect-cache")
def inspect_cache_cmd(
    path: Path = typer.Argument(..., help="A cache folder (or one split's .parquet file)."),
    full: bool = typer.Option(False, "--full", help="Print the whole metadata JSON of each split."),
    verify: int = typer.Option(0, help="Re-run the teacher live on N random cached (image, view) rows and compare."),
    teacher: Optional[str] = typer.Option(None, help="For --verify: the teacher.", show_default="as recorded in the cache"),
    dataset: Optional[str] = typer.Option(None, help="For --verify: the dataset.", show_default="as recorded in the cache"),
    device: str = typer.Option("auto", help="For --verify: auto|cpu|cuda."),
):
    """Print a cache's metadata and teacher accuracy per split, and verify every file."""
    from kdpipe import logit_store

    with user_errors():
        if verify < 0:
            raise KdpipeError(f"--verify takes a number of rows to replay, >= 0 (got {verify})")
        files = {path.stem: path} if path.is_file() else logit_store.cache_splits(path, where=str(path))
        rows = []
        for name, f in files.items():
            split = logit_store.read_split(f)  # verifies format and checksum
            plain = split.view0()
            acc = float((plain.teacher_logits().argmax(1) == plain.labels).mean())  # top-1 is kept by --topk too
            if abs(acc - split.meta["teacher_accuracy"]) > 1e-9:
                raise KdpipeError(f"{f}: stored teacher accuracy {split.meta['teacher_accuracy']:.4f} differs from "
                                  f"the recomputed {acc:.4f}; rebuild it with --force")
            rows.append((name, split, acc, f.stat().st_size))
        logit_store.check_one_source({name: split.meta for name, split, _, _ in rows}, str(path))
    first = rows[0][1].meta
    console.print(f"[bold]teacher[/]  {first['teacher']['spec']}  revision={first['teacher']['revision']}  "
                  f"weights_sha256={str(first['teacher']['weights_sha256'])[:16]}")
    console.print(f"[bold]dataset[/]  {first['dataset']['spec']}  labels={first['label_names']}")
    console.print(f"[bold]format[/]   {first['format']} v{first['format_version']}  kdpipe {first['kdpipe_version']}"
                  f"  precision={first['precision']}  device={first['device']}")
    storage = first.get("logits_storage", logit_store.FULL)
    console.print("[bold]logits[/]   " + ("all C raw logits, float32" if storage["kind"] == "full" else
                                          f"top-{storage['k']} raw logits ({storage['dtype']}) + logsumexp"))
    table = Table()  # fits 80 columns: views per image, the teacher's accuracy, the dataset split's fingerprint
    for col in ("split", "rows", "views", "classes", "acc", "img/s", "dataset", "size"):
        table.add_column(col, no_wrap=True, justify="left" if col in ("split", "dataset") else "right")
    for name, split, acc, size in rows:
        m = split.meta
        table.add_row(name, str(m["rows"]), str(m.get("views", 1)), str(m["num_classes"]), f"{acc:.1%}",
                      f"{m['images_per_s']:.1f}", m["dataset_fingerprint"][:8], _human_bytes(size))
    console.print(table)
    for name, split, _, _ in rows:
        if split.meta.get("augment"):
            a = split.meta["augment"]
            console.print(f"[bold]views[/]    {name}: {a['views']} per image + the image itself; {a['policy']}")
    console.print(f"verified {len(rows)} split files: readable, checksum ok, teacher accuracy recomputed")
    if full:
        for name, split, _, _ in rows:
            console.print_json(json.dumps(split.meta))
    if verify:
        from kdpipe import cache_teacher

        with user_errors():
            r = cache_teacher.replay(path if path.is_dir() else path.parent, verify, teacher, dataset, device)
        console.print(f"replayed {r['pairs']} cached rows ({r['augmented_views']} augmented views, {r['mixed_views']} "
                      "of them mixed) through the live "
                      f"teacher ({r['precision']}, {r['device']}): max |Δlogit| {r['max_abs_diff']:.2e}, "
                      f"KL mean {r['mean_kl']:.2e} max {r['max_kl']:.2e}, argmax agreement {r['agreement']:.2%}")


@app.command("train-student")
def train_student_cmd(
    cache: Optional[Path] = typer.Option(None, help="Stage one's folder (required unless --alpha 0)."),
    dataset: Optional[str] = typer.Option(None, help="Dataset.", show_default="the one the cache was built from"),
    image_column: Optional[str] = typer.Option(None, help="Image column.", show_default="as cached, or detected"),
    label_column: Optional[str] = typer.Option(None, help="Label column.", show_default="as cached, or detected"),
    train_split: str = typer.Option("train", help="Split to train on."),
    val_split: str = typer.Option("validation", help="Split that picks the best epoch."),
    test_split: str = typer.Option("test", help="Split reported at the end ('' for none)."),
    student: Optional[str] = typer.Option(None, help="Hub id or folder.", show_default="MobileNetV2 from scratch"),
    student_config: Optional[str] = typer.Option(None, help="Config overrides, e.g. depth_multiplier=0.75,image_size=160."),
    temperature: float = typer.Option(5.0, "--temperature", "-T", help="Softmax temperature T of the KD term."),
    alpha: float = typer.Option(0.5, "--alpha", "--lambda", help="Weight of the KD term (0 = from scratch, 1 = pure distillation: labels unused)."),
    loss: str = typer.Option("kd", help="KD term: kd (Hinton) | dkd (decoupled, Zhao 2022) | dist (correlations, Huang 2022)."),
    standardize: bool = typer.Option(False, "--standardize/--no-standardize", help="z-score both logit vectors before T (Sun 2024); kd and dkd."),
    dkd_beta: float = typer.Option(8.0, help="dkd: weight of the non-target term (mdistiller's CIFAR-100 default)."),
    dist_gamma: float = typer.Option(1.0, help="dist: weight of the intra-class term relative to the inter-class one."),
    lr: float = typer.Option(5e-5, help="Peak learning rate (AdamW)."),
    batch_size: int = typer.Option(8, help="Training batch size."),
    epochs: int = typer.Option(30, help="Training epochs."),
    weight_decay: float = typer.Option(0.0, help="AdamW weight decay (not on biases and norm scales)."),
    schedule: str = typer.Option("linear", help="linear|cosine|constant learning-rate schedule."),
    warmup_ratio: float = typer.Option(0.0, help="Fraction of steps of linear warm-up."),
    bn_momentum: Optional[float] = typer.Option(0.1, help="BatchNorm momentum, PyTorch semantics (0.997 = the guide's)."),
    precise_bn: bool = typer.Option(False, "--precise-bn/--no-precise-bn", help="Recompute BN statistics on the train split before each evaluation."),
    seed: int = typer.Option(0, help="Seed for init and data order."),
    precision: str = typer.Option("auto", help="auto|fp32|bf16|fp16."),
    device: str = typer.Option("auto", help="auto|cpu|cuda."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the student (2-core CPU: 1.08x per step after ~76 s compiling; see docs/benchmarks.md)."),
    out: Optional[Path] = typer.Option(None, help="Run folder.", show_default="data/runs/<name>"),
    name: Optional[str] = typer.Option(None, help="Run name.", show_default="from the settings"),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its last epoch."),
    views: bool = typer.Option(False, "--views/--no-views", help="Train on the cache's stored augmented views (one per image per epoch)."),
    eval_size: Optional[int] = typer.Option(None, help="Validate, test and save the student at this resolution.", show_default="its training resolution"),
    augment: str = typer.Option("none", help="none|flip: online augmentation the cached teacher did not see."),
    allow_inconsistent: bool = typer.Option(False, "--allow-inconsistent", help="Permit --augment with a KD term (warned in run.json)."),
    allow_changed_data: bool = typer.Option(False, "--allow-changed-data", help="Train although images changed since the cache was built (recorded in run.json)."),
    mix: str = typer.Option("none", help="none|mixup|cutmix within each batch; soft targets mixed alike (approximate, see docs/views.md)."),
    mix_alpha: float = typer.Option(1.0, help="Beta(a, a) of the mixing weight."),
):
    """Train a student against the cached teacher logits (the teacher is never loaded)."""
    from kdpipe import train_student
    from kdpipe.config import TrainConfig, parse_overrides

    with user_errors():
        cfg = TrainConfig(cache=cache, dataset=dataset, image_column=image_column, label_column=label_column,
                          train_split=train_split, val_split=val_split, test_split=test_split or None,
                          student=student, student_config=parse_overrides(student_config), temperature=temperature,
                          alpha=alpha, loss=loss, standardize=standardize, dkd_beta=dkd_beta, dist_gamma=dist_gamma,
                          lr=lr, batch_size=batch_size, epochs=epochs, weight_decay=weight_decay,
                          schedule=schedule, warmup_ratio=warmup_ratio, bn_momentum=bn_momentum,
                          precise_bn=precise_bn, seed=seed, precision=precision, device=device, compile=compile,
                          out=out, name=name, resume=resume, views=views, eval_size=eval_size, augment=augment,
                          allow_inconsistent=allow_inconsistent, allow_changed_data=allow_changed_data, mix=mix,
                          mix_alpha=mix_alpha)
        from kdpipe.runtime import distributed

        if distributed()[0] > 0:  # under torchrun: rank 0 alone reports
            train_student.run(cfg)
            return
        with _progress() as bar:
            on_progress = _bars(bar)

            def on_epoch(r: dict):
                v = r["validation"]
                extra = f"  agree {v['teacher_agreement']:.1%}" if "teacher_agreement" in v else ""
                bar.console.print(f"epoch {r['epoch']:>3}  loss {r['train']['loss']:.4f}  val acc {v['accuracy']:.2%}"
                                  f"  f1 {v['macro_f1']:.3f}{extra}  {r['train_images_per_s']:.0f} img/s")

            report = train_student.run(cfg, progress=on_progress, on_epoch=on_epoch)
    _print_run(report)


def _print_run(report) -> None:
    config = report.run.get("config", {})
    val_split, test_split = config.get("val_split", "validation"), config.get("test_split") or "test"
    table = Table(title=f"best epoch {report.best_epoch} (chosen on {val_split}) -> {report.out}")
    for col in ("split", "accuracy", "macro-F1", "teacher agreement", "KL to teacher"):
        table.add_column(col)
    for name, m in ((val_split, report.validation), (test_split, report.test)):
        if m:
            table.add_row(name, f"{m['accuracy']:.2%}", f"{m['macro_f1']:.3f}",
                          f"{m['teacher_agreement']:.2%}" if "teacher_agreement" in m else "-",
                          f"{m['kl_to_teacher']:.4f}" if "kl_to_teacher" in m else "-")
    console.print(table)
    if report.confusion_matrix:
        _print_confusion(report.confusion_matrix, report.label_names, "test confusion (rows: true)")
    console.print(f"wall time {report.wall_time_s:.0f} s; student saved in {report.out / 'model'}")
    for warning in (report.run.get("consistency", {}).get("warning"), report.run.get("changed_data", {}).get("warning")):
        if warning:
            console.print(f"[yellow]warning[/]: {warning} (recorded in run.json)", highlight=False)


def _print_confusion(cm, names, title) -> None:
    table = Table(title=title)
    table.add_column("")
    for n in names:
        table.add_column(n, justify="right")
    for n, row in zip(names, cm):
        table.add_row(n, *map(str, row))
    console.print(table)


@app.command("evaluate")
def evaluate_cmd(
    run_dir: Path = typer.Argument(..., help="A run folder written by train-student."),
    split: str = typer.Option("test", help="Split to evaluate."),
    dataset: Optional[str] = typer.Option(None, help="Dataset.", show_default="the run's"),
    device: str = typer.Option("auto", help="auto|cpu|cuda."),
):
    """Reload a saved student and evaluate it, independently of training."""
    from kdpipe import evaluate

    with user_errors():
        m = evaluate.saved(run_dir, split=split, dataset=dataset, device=device)
    console.print(f"{split}: accuracy {m['accuracy']:.2%}  macro-F1 {m['macro_f1']:.3f}  n={m['n']}" +
                  (f"  teacher agreement {m['teacher_agreement']:.2%}" if "teacher_agreement" in m else ""))
    names = json.loads((run_dir / "run.json").read_text())["label_names"]
    _print_confusion(m["confusion_matrix"], names, f"{split} confusion (rows: true)")


SWEEP_HELP = "Values 1,2,5 (grid or tpe) or a range low:high[:log] (tpe only); one value = fixed for every run."


@app.command("sweep")
def sweep_cmd(
    cache: Optional[Path] = typer.Option(None, help="Stage one's folder (required unless every --alpha is 0)."),
    dataset: Optional[str] = typer.Option(None, help="Dataset.", show_default="the one the cache was built from"),
    student: Optional[str] = typer.Option(None, help="Hub id or folder.", show_default="MobileNetV2 from scratch"),
    student_config: Optional[str] = typer.Option(None, help="Config overrides, e.g. depth_multiplier=0.75."),
    temperature: Optional[str] = typer.Option(None, "--temperature", "-T", help=f"T of the KD term. {SWEEP_HELP}"),
    alpha: Optional[str] = typer.Option(None, "--alpha", "--lambda", help="Weight of the KD term (0 = from scratch)."),
    loss: Optional[str] = typer.Option(None, help="kd,dkd,dist: the KD term (λ = 0 runs once, whatever the loss)."),
    standardize: Optional[str] = typer.Option(None, help="true,false: z-score logits before T (kd and dkd only)."),
    dkd_beta: Optional[str] = typer.Option(None, help="dkd: weight of the non-target term, e.g. 0.5,8."),
    dist_gamma: Optional[str] = typer.Option(None, help="dist: intra-class weight relative to inter-class."),
    lr: Optional[str] = typer.Option(None, help="Peak learning rate, e.g. 5e-5,1e-3 or 1e-5:1e-2:log."),
    batch_size: Optional[str] = typer.Option(None, help="Training batch size, e.g. 8,32."),
    epochs: Optional[str] = typer.Option(None, help="Training epochs.", show_default="30"),
    weight_decay: Optional[str] = typer.Option(None, help="AdamW weight decay."),
    warmup_ratio: Optional[str] = typer.Option(None, help="Fraction of steps of linear warm-up."),
    schedule: Optional[str] = typer.Option(None, help="linear,cosine,constant."),
    bn_momentum: Optional[str] = typer.Option(None, help="BatchNorm momentum (PyTorch semantics)."),
    precise_bn: bool = typer.Option(False, "--precise-bn/--no-precise-bn", help="Recompute BN statistics before each evaluation."),
    views: bool = typer.Option(False, "--views/--no-views", help="Train on the cache's stored augmented views."),
    mix: Optional[str] = typer.Option(None, help="none,mixup,cutmix: mixing within each batch."),
    mix_alpha: Optional[str] = typer.Option(None, help="Beta(a, a) of the mixing weight."),
    seeds: str = typer.Option("0,1,2", help="Seeds; every config runs every seed."),
    sampler: str = typer.Option("grid", help="grid (every config x seed) or tpe (Optuna's TPE, --trials configs)."),
    trials: Optional[int] = typer.Option(None, help="tpe: how many configs to try."),
    prune: str = typer.Option("none", help="none|median|halving: stop hopeless trials on per-epoch validation accuracy."),
    storage: Optional[str] = typer.Option(None, help="Optuna storage URL for many workers.", show_default="a journal file in --out"),
    out: Optional[Path] = typer.Option(None, help="Sweep folder.", show_default="data/sweeps/<name>"),
    name: Optional[str] = typer.Option(None, help="Study name.", show_default="the folder's name"),
    test_split: str = typer.Option("test", help="Split reported for the chosen config ('' for none)."),
    precision: str = typer.Option("auto", help="auto|fp32|bf16|fp16."),
    device: str = typer.Option("auto", help="auto|cpu|cuda."),
    stale_after: float = typer.Option(3600.0, help="Seconds of silence after which another host's trial is rerun."),
    allow_changed_data: bool = typer.Option(False, "--allow-changed-data", help="Train although images changed since the cache was built (recorded in each run.json)."),
):
    """Sweep student settings against one cache (an Optuna study; rerun the same command to resume or to add
    a worker). The teacher is never loaded."""
    from kdpipe import sweep, sweep_report
    from kdpipe.config import SweepConfig, TrainConfig, parse_overrides, split_space

    with user_errors():
        flags = {"temperature": temperature, "alpha": alpha, "lr": lr, "batch_size": batch_size, "epochs": epochs,
                 "weight_decay": weight_decay, "warmup_ratio": warmup_ratio, "schedule": schedule,
                 "bn_momentum": bn_momentum, "mix": mix, "mix_alpha": mix_alpha, "loss": loss,
                 "standardize": standardize, "dkd_beta": dkd_beta, "dist_gamma": dist_gamma}
        fixed, space = split_space(flags)
        searched_alpha = space.get("alpha") is not None
        train = TrainConfig(cache=cache, dataset=dataset, student=student, student_config=parse_overrides(student_config),
                            precise_bn=precise_bn, views=views, test_split=test_split or None, precision=precision,
                            device=device, allow_changed_data=allow_changed_data, **{"alpha": 0.0 if searched_alpha and cache is None else TrainConfig.alpha, **fixed})
        cfg = SweepConfig(train=train, space=space, seeds=_ints(seeds, "--seeds"), sampler=sampler, trials=trials,
                          prune=prune, storage=storage, out=out, name=name, stale_after_s=stale_after)
        console.print(f"sweep {cfg.study_name()} in {cfg.out_dir()}: {sampler}, seeds {cfg.seeds}, "
                      f"searching {', '.join(space) or 'nothing (seeds only)'}")
        with _progress() as bar:
            on_progress = _bars(bar)

            def on_trial(r, total: int):
                on_progress.clear()  # the next trial draws its own bars
                bar.console.print(f"trial {r.number:>3} ({total} planned)  {r.key}  seeds {r.seeds}  "
                                  f"val {r.validation:.2%}  {r.state}  {r.seconds:.0f} s")

            folder = sweep.run(cfg, progress=on_progress, on_trial=on_trial)
        _print_sweep(sweep_report.build(folder))


@app.command("sweep-report")
def sweep_report_cmd(sweep_dir: Path = typer.Argument(..., help="A folder written by kdpipe sweep.")):
    """Rebuild a sweep's table, results.csv/json and heatmap from its storage (finished or running)."""
    from kdpipe import sweep_report

    with user_errors():
        _print_sweep(sweep_report.build(sweep_dir))


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise KdpipeError(f"{flag}: expected integers like 0,1,2 (got {text!r})") from None


def _print_sweep(s) -> None:
    import math

    names = sorted({k for r in s.rows for k in r.params})
    table = Table(title=f"sweep {s.study_name}: best-epoch validation accuracy over seeds (sorted)")
    for col in ("#", *names, "seeds", "val mean ± std", "95% CI", "pruned"):
        table.add_column(col, justify="right")
    for i, r in enumerate(s.rows, 1):
        ci = "-" if math.isnan(r.val_ci95) else f"± {r.val_ci95:.2%}"
        style = "bold green" if r is s.best else None
        table.add_row(str(i), *(f"{r.params[n]:g}" if isinstance(r.params.get(n), float) else str(r.params.get(n, "-"))
                                for n in names), str(len(r.seeds)), f"{r.val_mean:.2%} ± {r.val_std:.2%}", ci,
                      str(r.pruned), style=style)
    console.print(table)
    counts = ", ".join(f"{v} {k}" for k, v in sorted(s.counts.items())) or "no trials yet"
    saved = 1 - s.epochs["run"] / s.epochs["planned"] if s.epochs["planned"] else 0.0
    console.print(f"trials: {counts}; epochs run {s.epochs['run']} of {s.epochs['planned']} planned "
                  f"({saved:.0%} saved by pruning); training time {s.seconds:.0f} s")
    if s.best is not None:
        from kdpipe.stats import mean_std_ci

        line = f"chosen on validation: [bold]{s.best.key}[/] (val {s.best.val_mean:.2%} ± {s.best.val_std:.2%})"
        if s.best.test:
            m, sd, _ = mean_std_ci(s.best.test)
            line += f"; its test accuracy, reported not used: [bold]{m:.2%} ± {sd:.2%}[/] over {len(s.best.test)} seeds"
        console.print(line)
    if s.teacher_gain:
        _print_gain(s.teacher_gain)
    if s.interrupted:
        console.print(f"[yellow]interrupted[/]: no process holds {', '.join(s.interrupted)} (its worker is gone); "
                      "rerun the sweep to continue from the last checkpoint", highlight=False)
    console.print("wrote " + ", ".join(str(f) for f in s.files))


def _print_gain(g: dict) -> None:
    """The teacher's gain: the best distilled config minus its alpha = 0 twin, in percentage points."""
    def pp(split: str) -> str:
        d = g[split]
        text = f"{split}{' (reported, not used)' if split == 'test' else ''} {100 * d['gap']:+.1f}"
        text += f" ± {100 * d['welch95']:.1f} pp (Welch 95%)" if d["welch95"] is not None else " pp (one seed: no interval)"
        if d["paired"]:
            text += f", paired by seed {100 * d['paired']['gap']:+.1f} ± {100 * d['paired']['ci95']:.1f} pp"
        return text

    parts = [pp(split) for split in ("validation", "test") if split in g]
    console.print(f"teacher's gain, {g['distilled']} − its λ = 0 twin {g['twin']}: " + "; ".join(parts))


def main():
    app()


if __name__ == "__main__":
    main()
