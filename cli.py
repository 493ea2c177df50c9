"""kdpipe's command line: parse flags -> build a config -> call one pipeline function -> print.

The only module that prints for the user; pipeline code raises KdpipeError, which becomes a one-line
`error:` message and exit status 1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402
from rich.table import Table  # noqa: E402

from kdpipe import runtime, settings  # noqa: E402
from kdpipe.config import TRAIN_DEFAULTS, CacheConfig, ExportConfig, SweepConfig, TrainConfig, recipe_line  # noqa: E402
from kdpipe.errors import KdpipeError  # noqa: E402
from kdpipe.plan import PlanOption  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Knowledge distillation for image classifiers with cached teacher logits.")
console = Console()
err_console = Console(stderr=True)


def _print_version(value: bool) -> None:
    if value:
        v = runtime.versions()
        libraries = ", ".join(f"{name} {version}" for name, version in v.items() if name != "kdpipe")
        console.print(f"kdpipe {v['kdpipe']} ({libraries})", highlight=False, soft_wrap=True)
        raise typer.Exit()


@app.callback()
def _quiet_libraries(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                                  help="Print kdpipe's version and those of the libraries it uses.")):
    """Library progress bars and advisories would bury kdpipe's own output; errors still show."""
    import datasets
    import huggingface_hub
    import transformers

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity(datasets.utils.logging.CRITICAL)  # its errors reach us as exceptions
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.logging.set_verbosity_error()  # a retried request warns per try; its failure reaches us
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # export: "torchvision is not installed" per operator set


@contextlib.contextmanager
def user_errors():
    """Turn KdpipeError into a one-line message and exit 1; anything else is a bug and keeps its traceback."""
    try:
        yield
    except KdpipeError as e:
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)  # [x] is text
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]: nothing half-written was left under a final name")
        raise typer.Exit(130) from None


class _Progress(Progress):
    """Bars that start drawing with the first one: a command refused before any work prints its error line
    alone (an empty display, started and stopped, left a blank line on stdout)."""

    def __enter__(self) -> "_Progress":
        return self

    def stop(self) -> None:
        if self.live.is_started:
            super().stop()

    def add_task(self, *args, **kwargs):
        if not self.live.is_started:
            self.start()
        return super().add_task(*args, **kwargs)


def _progress() -> Progress:
    return _Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
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


SEARCHABLE = "Searchable: several values, or a range (tpe)."


@dataclass(frozen=True)
class Group:
    """The options of one config dataclass: `search` types the searchable settings as text (a sweep's values
    or range); `skip` leaves fields out (a sweep sets them per trial)."""
    cls: type
    search: bool = False
    skip: tuple[str, ...] = ()


def configured(**groups: type | Group):
    """Build a command's options from config dataclasses (settings.setting: default, help, flags, panel), the
    one place each lives. The command receives, per group, the values typed (parsed; nested dataclasses such
    as ViewPolicy built), with every value left at its default omitted, and runs inside `user_errors`. The
    body's other parameters (an argument such as `export`'s RUN) are passed through as typer parses them."""
    groups = {name: g if isinstance(g, Group) else Group(g) for name, g in groups.items()}

    def decorate(body):
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for name, p in inspect.signature(body).parameters.items()
               if name not in groups]
        params = own + [p for g in groups.values() for p in _params(g.cls, g, "")]

        @functools.wraps(body)
        def command(**flags):
            with user_errors():
                return body(**{p.name: flags[p.name] for p in own},
                            **{name: _values(g.cls, g, "", flags) for name, g in groups.items()})

        del command.__wrapped__  # typer reads the generated signature, not the body's
        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate


def _fields(cls, group: Group):
    return [f for f in dataclasses.fields(cls) if f.init and f.metadata.get("cli", True) and f.name not in group.skip]


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _params(cls, group: Group, prefix: str) -> list[inspect.Parameter]:
    out = []
    for f in _fields(cls, group):
        m, default, kind = f.metadata, _default(f), settings.value_type(cls, f.name)
        if dataclasses.is_dataclass(kind):  # e.g. CacheConfig.augment: ViewPolicy's fields, flags --view-*
            out += _params(kind, Group(kind), f"{prefix}{f.name}__")
            continue
        option = dict(help=m["help"], rich_help_panel=m["panel"], show_default=m["shown"] or True)
        decls = m["flags"]
        if group.search and m["search"] is not None:  # a sweep: values or a range, as text
            kind, default = Optional[str], None
            decls = tuple(d.split("/")[0] for d in decls)  # --standardize true,false: not a switch here
            option.update(help=f"{m['help']} {SEARCHABLE}", show_default=m["shown"] or _text(_default(f)))
        elif m["parse"] is not None:  # typed as text, parsed by the setting's own parser
            kind, default = Optional[str], None
            option["show_default"] = m["shown"] or _text(_default(f)) or False
        else:
            kind = Optional[kind] if default is None else kind
        out.append(inspect.Parameter(prefix + f.name, inspect.Parameter.KEYWORD_ONLY, annotation=kind,
                                     default=typer.Option(default, *decls, **option)))
    return out


def _text(value) -> str:
    """A default as typed on the command line: [0, 1, 2] -> 0,1,2."""
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return "" if value is None or isinstance(value, dict) else str(value)


def _values(cls, group: Group, prefix: str, flags: dict) -> dict:
    """The typed values of one group, parsed; a text option not given (None) keeps the field's default."""
    out = {}
    for f in _fields(cls, group):
        m, kind = f.metadata, settings.value_type(cls, f.name)
        if dataclasses.is_dataclass(kind):
            out[f.name] = kind(**_values(kind, Group(kind), f"{prefix}{f.name}__", flags))
            continue
        value = flags[prefix + f.name]
        if group.search and m["search"] is not None:
            out[f.name] = value  # text: the sweep parses its values
        elif m["parse"] is not None:
            if value is not None:
                out[f.name] = m["parse"](value, settings.flag(f))
        else:
            out[f.name] = value
    return out


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


@app.command("cache-teacher")
@configured(flags=CacheConfig)
def cache_teacher_cmd(flags: dict):
    """Run the teacher once over every split and write its raw logits to Parquet."""
    from kdpipe import cache_teacher

    cfg = CacheConfig(**flags)
    if not runtime.main_process():  # under torchrun: rank 0 alone reports
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
    if reports and reports[0].note:
        console.print(f"[yellow]note[/]: {reports[0].note} (recorded in the split files)", highlight=False)
    if all(r.reused for r in reports):
        console.print("valid cache found for these inputs: nothing to do")


@app.command("demo")
def demo_cmd():
    """Run the whole pipeline offline on the embedded demo teacher and digits (data/demo/).

    The three commands it prints (cache-teacher, train-student, its λ = 0 twin), then the teacher, the distilled
    student and the twin side by side. Each step is idempotent: a rerun reuses what is done."""
    import shlex

    from kdpipe import demo

    group = typer.main.get_command(app)
    for argv in demo.STEPS:
        console.rule(f"kdpipe {shlex.join(argv)}", align="left", style="dim")
        code = group.main(argv, prog_name="kdpipe", standalone_mode=False)
        if code:  # the step printed its own error line
            raise typer.Exit(code)
    with user_errors():
        rows = demo.summary()
    table = Table(title="the embedded demo: teacher, distilled student, λ = 0 twin")
    for col in ("model", "validation", "test", "test agreement"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        table.add_row(f"{r.name} ({r.what})", f"{r.validation:.1%}", f"{r.test:.1%}",
                      "-" if r.test_agreement is None else f"{r.test_agreement:.1%}")
    console.print(table)
    console.print("in " + ", ".join(r.folder for r in rows), highlight=False, soft_wrap=True)
    kd, twin = rows[1], rows[2]
    console.print(f"distilled − twin on test: {100 * (kd.test - twin.test):+.1f} pp (one seed, "
                  f"{demo.EPOCHS} epochs; docs/results.md has several seeds and longer budgets)", highlight=False)


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
        rows = logit_store.inspect(path)
    _print_cache(rows)
    console.print(f"verified {len(rows)} split files: readable, checksum ok, teacher accuracy recomputed")
    if full:
        for _, split, _, _ in rows:
            console.print_json(json.dumps(split.meta))
    if verify:
        from kdpipe import cache_verify

        with user_errors():
            r = cache_verify.replay(path if path.is_dir() else path.parent, verify, teacher, dataset, device)
        console.print(f"replayed {r['pairs']} cached rows ({r['augmented_views']} augmented views, {r['mixed_views']} "
                      f"of them mixed) through the live teacher ({r['precision']}, {r['device']}): "
                      f"max |Δlogit| {r['max_abs_diff']:.2e}, KL mean {r['mean_kl']:.2e} max {r['max_kl']:.2e}, "
                      f"argmax agreement {r['agreement']:.2%}")
        _print_verdict(r)


def _print_verdict(r: dict) -> None:
    """inspect-cache --verify's decision: a line when the teacher's weights are not those the cache records, and
    exit 1 when the logits differ beyond what the two precisions explain (runtime.LOGIT_TOLERANCE)."""
    weights = r["weights_sha256"]
    if weights["cache"] and weights["live"] and weights["cache"] != weights["live"]:
        console.print(f"[yellow]warning[/]: the teacher's weights (sha256 {weights['live'][:16]}) are not those the "
                      f"cache was built with (sha256 {weights['cache'][:16]})", highlight=False)
    if not r["within_tolerance"]:
        with user_errors():
            raise KdpipeError(f"the cache does not match this teacher: max |Δlogit| {r['max_abs_diff']:.3g} is beyond "
                              f"the tolerance {r['tolerance']:.3g} of a {r['cache_precision']} cache replayed in "
                              f"{r['precision']}; rebuild it with kdpipe cache-teacher --force, or pass the teacher "
                              "it was built with (--teacher)")
    console.print(f"verdict: the cache matches the teacher (max |Δlogit| within {r['tolerance']:.3g}, the tolerance of "
                  f"a {r['cache_precision']} cache replayed in {r['precision']})", highlight=False)


def _print_cache(rows: list) -> None:
    """inspect-cache's summary: the teacher, dataset and format the cache records, then one table row per split."""
    from kdpipe import logit_store

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


@app.command("train-student")
@configured(flags=TrainConfig)
def train_student_cmd(flags: dict):
    """Train a student against the cached teacher logits (the teacher is never loaded)."""
    from kdpipe import train_student

    cfg = train_student.as_started(TrainConfig(**flags))
    if not runtime.main_process():  # under torchrun: rank 0 alone reports
        train_student.run(cfg)
        return
    with _progress() as bar:
        def on_epoch(r: dict):
            v = r["validation"]
            extra = f"  agree {v['teacher_agreement']:.1%}" if "teacher_agreement" in v else ""
            bar.console.print(f"epoch {r['epoch']:>3}  loss {r['train']['loss']:.4f}  val acc {v['accuracy']:.2%}"
                              f"  nll {v['nll']:.3f}  f1 {v['macro_f1']:.3f}{extra}  {r['train_images_per_s']:.0f} img/s")

        report = train_student.run(cfg, progress=_bars(bar), on_epoch=on_epoch,
                                   announce=lambda line: bar.console.print(line, highlight=False, soft_wrap=True))
    _print_run(report)


def _print_run(report) -> None:
    config = report.run.get("config", {})
    val_split, test_split = config.get("val_split", "validation"), config.get("test_split") or "test"
    rule = report.run.get("best_epoch_rule") or {"tied": 1}
    ties = f", {rule['tied']} epochs tied: {rule['rule']} rule" if rule["tied"] > 1 else ""
    table = Table(title=f"best epoch {report.best_epoch} (chosen on {val_split}{ties}) -> {report.out}")
    for col in ("split", "accuracy", "NLL", "macro-F1", "teacher agreement", "KL to teacher"):
        table.add_column(col)
    for name, m in ((val_split, report.validation), (test_split, report.test)):
        if m:  # NLL: absent from an epoch trained before it was recorded (a resumed run)
            table.add_row(name, f"{m['accuracy']:.2%}", f"{m['nll']:.4f}" if "nll" in m else "-", f"{m['macro_f1']:.3f}",
                          f"{m['teacher_agreement']:.2%}" if "teacher_agreement" in m else "-",
                          f"{m['kl_to_teacher']:.4f}" if "kl_to_teacher" in m else "-")
    console.print(table)
    if report.confusion_matrix:
        _print_confusion(report.confusion_matrix, report.label_names, "test confusion (rows: true)")
    console.print(f"wall time {report.wall_time_s:.0f} s; student saved in {report.out / 'model'}")
    fresh = report.run.get("student_init", {}).get("reinitialised")
    if fresh:  # weights of the --student checkpoint drawn afresh: its head, or a layer another config resized
        console.print(f"student: {len(fresh)} weight tensor(s) of {report.run['student_init']['from']} drawn afresh "
                      f"(a shape changed, or absent from it): {', '.join(fresh[:4])}{', ...' if len(fresh) > 4 else ''}",
                      highlight=False)
    for key in ("consistency", "changed_data", "label_issues", "split_overlap", "dataset_left_out"):
        warning = report.run.get(key, {}).get("warning")
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
    console.print(f"{split}: accuracy {m['accuracy']:.2%}  NLL {m['nll']:.4f}  macro-F1 {m['macro_f1']:.3f}  n={m['n']}" +
                  (f"  teacher agreement {m['teacher_agreement']:.2%}" if "teacher_agreement" in m else ""))
    if m.get("teacher_note"):
        console.print(m["teacher_note"], highlight=False)
    _print_confusion(m["confusion_matrix"], m["label_names"], f"{split} confusion (rows: true)")


@app.command("export")
@configured(flags=ExportConfig)
def export_cmd(run_dir: Path = typer.Argument(..., metavar="RUN", help="A run folder written by train-student."), *,
               flags: dict):
    """Export a run's student to ONNX (--int8: also int8), checked against it and timed beside the teacher.

    Fidelity is measured on the run's validation and test splits against the PyTorch student, with the bounds
    below fixed before measuring: a bound missed writes nothing. Figures go into run.json and the model card."""
    from kdpipe import export

    with _progress() as bar:
        record = export.export(run_dir, ExportConfig(**flags), progress=_bars(bar))
    _print_export(run_dir, record)


def _print_export(run_dir: Path, record: dict) -> None:
    from kdpipe import export

    console.print(f"wrote {', '.join(str(run_dir / f) for f in record['files'].values())} "
                  f"(torch.onnx {record['exporter']} exporter, opset {record['opset']})", highlight=False)
    for kind, per_split in record["fidelity"].items():
        for split, m in per_split.items():
            agree = m.get("agreement", m.get("agreement_with_fp32"))
            console.print(f"ONNX {kind} on {split}: accuracy {m['accuracy']:.2%}, argmax agreement with PyTorch "
                          f"{agree:.2%}, max |Δlogit| {m['max_abs_logit_diff']:.1e}"
                          + (f", drop {100 * m['accuracy_drop']:+.1f} pp" if "accuracy_drop" in m else ""), highlight=False)
    if "speed" in record:
        table = Table(title=f"speed and size on {record['speed']['cpu']}, {record['speed']['threads']} threads")
        for col in ("model", "runtime", "input", "latency b1 median (p90)", "b32 images/s", "params", "file"):
            table.add_column(col, justify="left" if col in ("model", "runtime") else "right")
        for r in record["speed"]["rows"]:
            table.add_row(r["model"], r["runtime"], f"{r['input_size'][0]}", f"{r['latency_ms_median']:.1f} ms "
                          f"({r['latency_ms_p90']:.1f})", f"{r['throughput_per_s']:.1f}", f"{r['parameters'] / 1e6:.2f} M",
                          _human_bytes(r["file_bytes"]) if r.get("file_bytes") else "-")
        console.print(table)
        console.print(export.headline(record["summary"]), highlight=False)
    console.print(f"recorded in {run_dir / 'run.json'} (export) and {run_dir / 'model' / 'README.md'}", highlight=False)


@app.command("sweep")
@configured(train=Group(TrainConfig, search=True, skip=("out", "name", "seed", "resume")), sweep=SweepConfig,
            study=PlanOption)
def sweep_cmd(train: dict, sweep: dict, study: dict):
    """Sweep student settings against one cache (an Optuna study; rerun to resume or to add a worker).

    Every train-student setting can be given, fixed for all runs; a searchable one takes several
    values (1,2,5: a grid, or tpe's choices) or a range low:high[:log] (--sampler tpe), and one value fixes
    it. --plan FILE runs a study plan instead: named arms, budgets, seeds, twins. The teacher is never loaded."""
    from kdpipe import plan as plans, sweep as sweeps, sweep_report

    if study["plan"] is not None:
        given = [k for k, v in train.items() if v is not None and v != TRAIN_DEFAULTS.get(k)] + \
                [k for k, v in sweep.items() if k not in ("out", "storage", "name", "stale_after_s", "storage_wait_s")
                 and v != _default(next(f for f in dataclasses.fields(SweepConfig) if f.name == k))]
        if given:
            raise KdpipeError(f"--plan {study['plan']} holds every run's settings and seeds; drop "
                              f"--{given[0].replace('_', '-')} (or write it into the plan)")
        plan = plans.load(study["plan"])
        console.print(f"study plan {plan.name} ({study['plan']}): {len(plan.arms)} arms, {len(plan.points())} runs; "
                      f"primary comparison {plan.primary.key}")
        run = lambda progress, on_trial, note: sweeps.run_plan(  # noqa: E731
            plan, sweep.get("out"), sweep.get("storage"), sweep.get("name"), sweep["stale_after_s"], progress, on_trial,
            sweep["storage_wait_s"], note)
    else:
        cfg = sweeps.as_started(SweepConfig.from_flags(train, **sweep))
        size = f" of {cfg.grid_trials:,} trials" if cfg.grid_trials is not None else f", {cfg.trials} configs"
        console.print(f"sweep {cfg.study_name()} in {cfg.out_dir()}: {cfg.sampler}{size}, seeds {cfg.seeds}, "
                      f"searching {', '.join(cfg.space) or 'nothing (seeds only)'}; {recipe_line(cfg.train)}",
                      highlight=False, soft_wrap=True)
        run = lambda progress, on_trial, note: sweeps.run(cfg, progress=progress, on_trial=on_trial, note=note)  # noqa: E731
    with _progress() as bar:
        on_progress = _bars(bar)

        def on_trial(r, total: int):
            on_progress.clear()  # the next trial draws its own bars
            bar.console.print(f"trial {r.number:>3} ({total} planned)  {r.key}  seeds {r.seeds}  "
                              f"val {r.validation:.2%}  {r.state}  {r.seconds:.0f} s")

        def on_note(line: str):  # the storage waiting for its database, what --hours leaves
            bar.console.print(line, markup=False, highlight=False, style="yellow", soft_wrap=True)

        folder = run(on_progress, on_trial, on_note)
    _print_report(sweep_report.build(folder))


@app.command("sweep-report")
def sweep_report_cmd(sweep_dir: Path = typer.Argument(..., help="A folder written by kdpipe sweep.")):
    """Rebuild a sweep's table, results.csv/json and heatmap from its storage (finished or running)."""
    from kdpipe import sweep_report

    with user_errors():
        _print_report(sweep_report.build(sweep_dir))


def _print_report(s) -> None:
    """A grid's or TPE's table, or a plan study's report."""
    from kdpipe import study_report

    if isinstance(s, study_report.StudySummary):
        console.print(study_report.text(s), highlight=False)
        console.print("wrote " + ", ".join(str(f) for f in s.files))
    else:
        _print_sweep(s)


def _print_sweep(s) -> None:
    import math

    names = sorted({k for r in s.rows for k in r.params})
    table = Table(title=f"sweep {s.study_name}: best-epoch validation accuracy over seeds (sorted)")
    for col in ("#", *names, "seeds", "val mean ± SD", "95% CI", "pruned"):
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
        line = f"chosen on validation: [bold]{s.best.key}[/] (val {s.best.val_mean:.2%} ± {s.best.val_std:.2%} SD)"
        if s.best.test:
            m, sd = s.best.test_mean_std()
            line += f"; its test accuracy, reported not used: [bold]{m:.2%} ± {sd:.2%}[/] (SD) over {len(s.best.test)} seeds"
        console.print(line)
    if s.teacher_gain:
        _print_gain(s.teacher_gain)
    for loss, gain in (s.loss_gains or {}).items():
        if gain:
            _print_gain(gain, f"--loss {loss}, its best config chosen on validation")
    if s.interrupted:
        console.print(f"[yellow]interrupted[/]: no process holds {', '.join(s.interrupted)} (its worker is gone); "
                      "rerun the sweep to continue from the last checkpoint", highlight=False)
    if s.files:
        console.print("wrote " + ", ".join(str(f) for f in s.files))
    if s.unwritten:
        console.print(f"[yellow]not written[/] in {s.out}: {', '.join(s.unwritten)}; the table above is the whole "
                      "report (copy the folder somewhere writable to keep the files)", highlight=False)


def _print_gain(g: dict, label: str = "teacher's gain") -> None:
    """The teacher's gain: the best distilled config minus its alpha = 0 twin, in percentage points."""
    def pp(split: str) -> str:
        d = g[split]
        text = f"{split}{' (reported, not used)' if split == 'test' else ''} {100 * d['gap']:+.1f}"
        text += f" ± {100 * d['welch95']:.1f} pp (Welch 95%)" if d["welch95"] is not None else " pp (one seed: no interval)"
        if d["paired"]:
            text += f", paired by seed {100 * d['paired']['gap']:+.1f} ± {100 * d['paired']['ci95']:.1f} pp (95% t)"
        return text

    parts = [pp(split) for split in ("validation", "test") if split in g]
    console.print(f"{label}, {g['distilled']} − its λ = 0 twin {g['twin']}: " + "; ".join(parts))


def main():
    app()


if __name__ == "__main__":
    main()
