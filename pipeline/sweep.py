"""Student sweeps on Optuna: many `train-student` runs against one teacher-logit cache.

The teacher was paid for once in stage one; a sweep only trains students. Each trial is an ordinary
train-student run folder under `<sweep>/runs/`, and the study (which trials exist, their parameters,
state and results) lives in an Optuna storage: by default a journal file inside the sweep folder, or
any RDB URL (`--storage postgresql://...`) shared by workers on several machines.

grid (default)  one trial per (config, seed) of the full product (alpha = 0 once, whatever the
                temperatures: grid_points). Workers claim points through the
                storage: a worker picks a point nobody holds, creates a trial carrying its parameters,
                then looks again; if another live trial holds the same point it steps back (its trial is
                marked FAIL, user attr "duplicate"). Of two claims, the later check always sees the
                earlier claim, so every point runs exactly once however many workers start together.
tpe             `--trials N` configs sampled by Optuna's TPESampler; each runs every seed in turn and
                its value is the mean best-epoch validation accuracy over the seeds.

Resuming is rerunning the same command: COMPLETE and PRUNED trials are kept; a RUNNING trial whose
worker died (same host: its pid is gone; another host: silent for `stale_after_s`) is marked FAIL and
its point is run again, continuing its run folder from the last epoch checkpoint.

Pruning (`--prune median|halving`) reports validation accuracy after every epoch to Optuna's
MedianPruner or SuccessiveHalvingPruner; a pruned trial keeps its run folder (metrics.jsonl) as it stood.
Everything is chosen on validation; test accuracy is read only for the chosen config (sweep_report.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import random
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import files, student, student_data, sweep_storage, train_student
from .sweep_budget import Budget
from .config import LOSS_SETTINGS, SweepConfig, TrainConfig, applicable, comparable
from .errors import KdpipeError

SPEC_FILE = "sweep.json"
SHORT = {f.name: f.metadata["search"] for f in dataclasses.fields(TrainConfig)  # a config's name: T5-a0.5
         if f.metadata["search"] is not None}


@dataclass(frozen=True)
class Point:
    """One grid trial: a config (the searched settings) and a seed."""
    params: dict
    seed: int

    @property
    def config_key(self) -> str:
        return config_key(self.params)

    @property
    def key(self) -> str:
        return f"{self.config_key}-seed{self.seed}"


def config_key(params: dict) -> str:
    """A readable folder-safe name for a config, e.g. T5-a0.5-lr5e-05 or T4-a0.5-dkd-ls1-b8 ("base" when
    nothing is searched)."""
    def part(k) -> str:
        v = params[k]
        return f"{SHORT[k]}{int(v)}" if isinstance(v, bool) else f"{SHORT[k]}{v:g}" if isinstance(v, float) \
            else f"{SHORT[k]}{v}"

    return "-".join(part(k) for k in SHORT if k in params) or "base"


def grid_points(cfg: SweepConfig) -> list[Point]:
    """Every config of the product x every seed, except that alpha = 0 runs once per setting of the rest:
    without the KD term the temperature and the loss change nothing, so they are left out of those configs;
    likewise a loss's own settings (e.g. --dkd-beta) are left out of the other losses' configs (applicable)."""
    dims = cfg.dims
    names = sorted(dims)
    configs = {}
    for values in itertools.product(*(dims[n].choices for n in names)):
        c = applicable(dict(zip(names, values)), cfg.train)
        configs.setdefault(config_key(c), c)
    return [Point(c, seed) for c in configs.values() for seed in cfg.seeds]


# ------------------------------------------------------------------------------------- storage, study


def open_study(cfg: SweepConfig, out: Path, note: Callable[[str], None] | None = None):
    """Create or join the study; the sweep's settings are stored with it and must match on joining. `note` hears
    the storage's waits (sweep_storage)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(cfg.storage, out, cfg.storage_wait_s, note)
    pruner = {"none": optuna.pruners.NopPruner(),
              "median": optuna.pruners.MedianPruner(n_startup_trials=max(2, len(cfg.seeds)), n_warmup_steps=1),
              "halving": optuna.pruners.SuccessiveHalvingPruner()}[cfg.prune]
    sampler = optuna.samplers.TPESampler(seed=cfg.seeds[0]) if cfg.sampler == "tpe" else \
        optuna.samplers.RandomSampler()  # grid trials are queued with their values; nothing is sampled
    study = optuna.create_study(storage=storage, study_name=cfg.study_name(), direction="maximize",
                                load_if_exists=True, sampler=sampler, pruner=pruner)
    spec = json.loads(json.dumps(cfg.spec()))
    saved = study.user_attrs.get("kdpipe_sweep")
    if saved is None:
        study.set_user_attr("kdpipe_sweep", spec)
    elif saved != (spec := _as_saved(spec, saved)):
        differs = sorted(k for k in spec if spec[k] != saved.get(k))
        raise KdpipeError(f"study {cfg.study_name()!r} was started with other settings ({', '.join(differs)}); "
                          "use the same flags to resume or join it, or another --out/--name")
    return study


def _as_saved(spec: dict, saved: dict) -> dict:
    """`spec` without the train settings a sweep started by an earlier kdpipe lacks and that hold their default."""
    return {**spec, "train": comparable(spec["train"], saved.get("train", {}))}


def _same_inputs(study, inputs: dict) -> None:
    """Record what the sweep reads, by content; refuse to add trials on other inputs to finished ones (a cache
    rebuilt in place, data changed), which would mix two teachers' results in one table. A sweep none of whose
    trials finished (its first refused on data since fixed) takes the new inputs."""
    from optuna.trial import TrialState

    saved = study.user_attrs.get("kdpipe_inputs")
    if saved == inputs:
        return
    if saved is not None and study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        raise KdpipeError(f"study {study.study_name!r} was started on other inputs (the cache or the dataset changed "
                          "since, by content: its finished trials would mix with trials on the new ones); restore "
                          "them to resume it, or choose another --out")
    study.set_user_attr("kdpipe_inputs", inputs)


def open_storage(url: str | None, out: Path, wait_s: float = 0.0, note: Callable[[str], None] | None = None):
    """None -> Optuna's journal file `<out>/study.journal` (safe for several local processes at once);
    otherwise an RDB URL (sqlite:///file.db, postgresql://user@host/db, mysql://...). Its calls wait up to
    `wait_s` for a database that stops answering (sweep_storage)."""
    return sweep_storage.open_storage(url, out, wait_s, note)


def _claim_folder(cfg: SweepConfig, out: Path) -> None:
    """Write sweep.json (how to reopen the study) once, atomically; later workers check it matches."""
    from .locking import make_folder

    make_folder(out)  # a file, a broken link or an unwritable place: one line naming --out
    other = next((p.name for p in out.iterdir() if p.suffix == ".parquet" or p.name in ("run.json", "checkpoint.pt")),
                 None)
    if other:
        raise KdpipeError(f"--out {out} holds {other}: it is a cache or a train-student run, not a sweep; choose "
                          "another --out")
    record = {"study_name": cfg.study_name(), "storage": cfg.storage, "spec": json.loads(json.dumps(cfg.spec()))}
    path = out / SPEC_FILE
    tmp = files.temporary(path)
    tmp.write_text(json.dumps(record, indent=2))
    try:
        os.link(tmp, path)  # atomic create-if-absent: of two workers starting together, one writes
    except FileExistsError:
        saved = load_spec(out)
        record["spec"] = _as_saved(record["spec"], saved["spec"])
        if saved["spec"] != record["spec"] or saved["study_name"] != record["study_name"]:
            differs = sorted(k for k in record["spec"] if record["spec"][k] != saved["spec"].get(k))
            raise KdpipeError(f"--out {out} holds a sweep with other settings ({', '.join(differs) or 'study name'});"
                              " rerun it with the same flags to resume, or choose another --out") from None
    finally:
        tmp.unlink(missing_ok=True)


def load_spec(out: Path) -> dict:
    """sweep.json of the sweep folder `out`: how to reopen its study, and its settings."""
    path = Path(out) / SPEC_FILE
    if not path.exists():
        raise KdpipeError(f"{out}: no {SPEC_FILE}; pass a folder written by kdpipe sweep")
    try:
        record = json.loads(path.read_text())
        if not all(k in record for k in ("study_name", "storage", "spec")):
            raise ValueError("a key is missing")
    except (ValueError, OSError) as e:  # JSONDecodeError is a ValueError
        raise KdpipeError(f"{path} is damaged ({type(e).__name__}: {e}); it is written once when the sweep starts: "
                          "restore it, or start the sweep again in another --out") from None
    return record


# ------------------------------------------------------------------------------------ liveness


def _owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "alive_at": time.time()}


def _is_stale(trial, stale_after_s: float) -> bool:
    owner = trial.user_attrs.get("owner")
    if not owner:
        return time.time() - trial.datetime_start.timestamp() > stale_after_s if trial.datetime_start else False
    if owner["host"] == socket.gethostname():
        try:
            os.kill(owner["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    return time.time() - owner["alive_at"] > stale_after_s


def fail_stale_trials(study, stale_after_s: float) -> list[int]:
    """Mark RUNNING trials whose worker is gone as FAIL (their points become free again)."""
    from optuna.trial import TrialState

    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if _is_stale(t, stale_after_s):
            study._storage.set_trial_user_attr(t._trial_id, "failed", "worker died")
            if study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
                failed.append(t.number)
    return failed


# --------------------------------------------------------------------------------------- one trial


class _Pruned(Exception):
    pass


@dataclass
class TrialResult:
    number: int
    key: str
    params: dict
    seeds: list[int]
    state: str  # complete | pruned
    validation: float  # best-epoch validation accuracy (mean over seeds for tpe)
    seconds: float
    runs: list[dict]


def _run_one(cfg: SweepConfig, trial, params: dict, seed: int, out: Path, report_epochs: bool,
             progress: Callable | None, shared: student_data.SharedData) -> dict:
    """One train-student run folder; resumes a folder left by a dead worker. Returns its summary."""
    run_dir = out / "runs" / f"{config_key(params)}-seed{seed}"
    tcfg = dataclasses.replace(cfg.train, **params, seed=seed, out=run_dir, name=None, resume=True,
                               from_recipe=[n for n in cfg.train.from_recipe if n not in params])  # searched: not the recipe's
    done = []
    if report_epochs and (run_dir / "metrics.jsonl").exists():  # epochs of an earlier attempt
        done = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]

    def on_epoch(record: dict) -> None:
        trial.set_user_attr("owner", _owner())  # heartbeat for workers on other hosts
        if report_epochs:
            trial.report(record["validation"]["accuracy"], record["epoch"])
            if trial.should_prune():
                raise _Pruned

    for record in done:
        on_epoch(record)
    try:
        report = train_student.run(tcfg, progress=progress, on_epoch=on_epoch, shared=shared)
    except _Pruned:
        history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
        return {"seed": seed, "run": str(run_dir), "pruned": True, "epochs_run": len(history),
                "validation": max(r["validation"]["accuracy"] for r in history),
                "seconds": sum(r["epoch_time_s"] for r in history)}
    return {"seed": seed, "run": str(run_dir), "pruned": False, "epochs_run": len(report.history),
            "best_epoch": report.best_epoch, "validation": report.validation["accuracy"],
            "test": report.test["accuracy"] if report.test else None,
            "seconds": sum(r["epoch_time_s"] for r in report.history)}


def _finish_trial(study, trial, key: str, params: dict, seeds: list[int], runs: list[dict]) -> TrialResult:
    from optuna.trial import TrialState

    pruned = any(r["pruned"] for r in runs)
    value = sum(r["validation"] for r in runs) / len(runs)
    trial.set_user_attr("runs", runs)
    if pruned:  # Optuna keeps the last reported epoch's value for a pruned trial
        study.tell(trial, state=TrialState.PRUNED)
    else:
        study.tell(trial, value, state=TrialState.COMPLETE)
    return TrialResult(trial.number, key, params, seeds, "pruned" if pruned else "complete", value,
                       sum(r["seconds"] for r in runs), runs)


@contextlib.contextmanager
def _failing_on_error(study, trial):
    """An error (bad cache, full disk, Ctrl-C) marks the trial FAIL, so a rerun starts its point again."""
    from optuna.trial import TrialState

    try:
        yield
    except BaseException as e:
        with sweep_storage.recording_failure(study):  # the storage may be what failed: e is what is raised
            trial.set_user_attr("failed", str(e).splitlines()[0][:500] if str(e) else type(e).__name__)
            study.tell(trial, state=TrialState.FAIL)
        raise


# ---------------------------------------------------------------------------------------- workers


def _grid_worker(cfg: SweepConfig, study, out: Path, progress, on_trial, shared: student_data.SharedData,
                 budget: Budget) -> None:
    from optuna.trial import TrialState

    points = {p.key: p for p in grid_points(cfg)}
    choices = {name: list(d.choices) for name, d in cfg.dims.items()}
    choices["seed"] = list(cfg.seeds)
    rng = random.Random(f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}")
    collided = False
    while True:
        fail_stale_trials(study, cfg.stale_after_s)
        held = _held_points(study)  # once: each read is a query of every trial on an RDB
        free = [p.key for p in budget.fitting(study, [p for k, p in points.items() if k not in held])]
        queued = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))  # e.g. a dead worker's
        if not free and not queued:
            return
        if free:  # the grid runs in order; after a collision, a random pick near the front spreads workers
            point = points[free[rng.randrange(min(len(free), 4)) if collided else 0]]
            study.enqueue_trial({**point.params, "seed": point.seed},
                                user_attrs={"point": point.key, "config": point.config_key})
        trial = study.ask()  # pops the oldest waiting trial: this one, or one another worker queued
        key = trial.user_attrs.get("point")
        rivals = [t for t in study.get_trials(deepcopy=False, states=_live_states())
                  if t.number != trial.number and key is not None and t.user_attrs.get("point") == key]
        if key not in points or rivals:  # another worker took the queued trial, claimed the point too, or
            # queued it under an older kdpipe whose grid had other points: step back
            trial.set_user_attr("duplicate", rivals[0].number if rivals else "nothing queued")
            study.tell(trial, state=TrialState.FAIL)
            time.sleep(rng.uniform(0.05, 0.5))
            collided = True
            continue
        collided = False
        point = points[key]
        if not budget.allows(study, point):  # a queued trial another than the one chosen, which --hours leaves
            trial.set_user_attr("duplicate", "left for later (--hours)")
            study.tell(trial, state=TrialState.FAIL)
            return
        trial.set_user_attr("owner", _owner())
        for name in sorted(point.params.keys() | {"seed"}):  # the queued values, recorded as Optuna parameters
            trial.suggest_categorical(name, choices[name])
        with _failing_on_error(study, trial), budget.measuring(trial, [out / "runs" / point.key]):
            run = _run_one(cfg, trial, point.params, point.seed, out, cfg.prune != "none", progress, shared)
        result = _finish_trial(study, trial, point.key, point.params, [point.seed], [run])
        if on_trial:
            on_trial(result, len(points))


def _live_states() -> tuple:
    """The trial states that hold a point or count against the budget: every state but FAIL."""
    from optuna.trial import TrialState

    return TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED, TrialState.WAITING


def _held_points(study) -> set[str]:
    return {t.user_attrs.get("point") for t in study.get_trials(deepcopy=False, states=_live_states())}


def _tpe_worker(cfg: SweepConfig, study, out: Path, progress, on_trial, shared: student_data.SharedData,
                budget: Budget) -> None:
    from optuna.trial import TrialState

    counted = _live_states()
    while True:
        for number in fail_stale_trials(study, cfg.stale_after_s):  # rerun a dead worker's config
            study.enqueue_trial(study.trials[number].params)
        if len(study.get_trials(deepcopy=False, states=counted)) >= cfg.trials or \
                not budget.allows_tpe(study, len(cfg.seeds)):
            return
        trial = study.ask()
        trial.set_user_attr("owner", _owner())
        ahead = [t for t in study.get_trials(deepcopy=False, states=counted) if t.number < trial.number]
        if len(ahead) >= cfg.trials:  # other workers filled the budget meanwhile
            trial.set_user_attr("duplicate", "surplus")
            study.tell(trial, state=TrialState.FAIL)
            return
        params = _suggest(trial, cfg)
        key = config_key(params)
        trial.set_user_attr("point", key)
        trial.set_user_attr("config", key)
        runs = []
        folders = [out / "runs" / f"{key}-seed{seed}" for seed in cfg.seeds]
        with _failing_on_error(study, trial), budget.measuring(trial, folders):
            for i, seed in enumerate(cfg.seeds):  # prune on the first seed's curve; the others run in full
                runs.append(_run_one(cfg, trial, params, seed, out, cfg.prune != "none" and i == 0, progress, shared))
                if runs[-1]["pruned"]:
                    break
        result = _finish_trial(study, trial, key, params, list(cfg.seeds[:len(runs)]), runs)
        if on_trial:
            on_trial(result, cfg.trials)


def _suggest(trial, cfg: SweepConfig) -> dict:
    """A TPE trial's settings, one per dimension; the loss (and alpha) first, so a setting of another loss
    than the one drawn is not sampled and TPE never learns from a value that changed nothing."""
    params = {}
    for name, d in sorted(cfg.dims.items(), key=lambda item: (item[0] not in ("alpha", "loss"), item[0])):
        if name in LOSS_SETTINGS and params.get("loss", cfg.train.loss) not in LOSS_SETTINGS[name]:
            continue
        if not d.is_range:
            params[name] = trial.suggest_categorical(name, list(d.choices))
        elif isinstance(d.low, int):
            params[name] = trial.suggest_int(name, d.low, d.high, log=d.log)
        else:
            params[name] = trial.suggest_float(name, d.low, d.high, log=d.log)
    return params


def run(cfg: SweepConfig, progress: Callable | None = None,
        on_trial: Callable[[TrialResult, int], None] | None = None, note: Callable[[str], None] | None = None) -> Path:
    """Work on the sweep until no trial is left to start (other workers may still be running theirs), or none
    fits in --hours. `note` hears what the user should know meanwhile (the storage's waits, what --hours leaves).
    Returns the sweep folder; `kdpipe.sweep_report.build(folder)` summarises it."""
    out, cfg = cfg.out_dir(), as_started(cfg)
    budget = Budget(cfg, note)  # --hours counts from the worker's start
    shared = student_data.SharedData()  # cache, dataset and pixels are read once per worker
    inputs = _check_inputs(cfg, shared)
    _claim_folder(cfg, out)
    study = open_study(cfg, out, note)
    _same_inputs(study, inputs)
    worker = _grid_worker if cfg.sampler == "grid" else _tpe_worker
    worker(cfg, study, out, progress, on_trial, shared, budget)
    return out


def as_started(cfg: SweepConfig) -> SweepConfig:
    """The sweep as it runs: rerun or joined, one started before recipes keeps its defaults of then."""
    if not (cfg.out_dir() / SPEC_FILE).exists():
        return cfg
    return dataclasses.replace(cfg, train=cfg.train.as_started(load_spec(cfg.out_dir())["spec"]["train"]))


def _check_inputs(cfg: SweepConfig, shared: student_data.SharedData) -> dict:
    """Fail before the sweep folder exists when its settings cannot make a run: the cache, the dataset and their
    match, the student's config and resolution, the cache's train split and stored views, and every loss the
    sweep may ask for against the cached targets (each run still checks the pixels). A refusal inside a trial
    left a folder whose recorded settings then refused the corrected command at the same --out. Returns what
    the sweep reads, by content (student_data.inputs_identity), which _same_inputs records in the study."""
    train = cfg.train
    cache, dataset = shared.get(("source", *train_student.source_key(train)), lambda: student_data.open_source(train))
    inputs = student_data.inputs_identity(cache, dataset)
    student_data.student_resolution(train, cache, dataset)  # its config and resolution, as each run sees them
    alpha = cfg.dims.get("alpha")
    kd = train.alpha if alpha is None else alpha.high if alpha.is_range else max(alpha.choices)  # its largest alpha
    student_data.require_train_split(dataclasses.replace(train, alpha=kd), cache)
    stored = student_data.stored_views(cache, dataset.splits[train.train_split]) if train.views else None
    if not kd:
        return inputs
    teacher = stored if stored is not None else cache[train.train_split]
    searched = {name: cfg.dims[name].choices for name in ("loss", "standardize") if name in cfg.dims}
    for values in itertools.product(*searched.values()):
        settings = applicable({"alpha": 1.0, **dict(zip(searched, values))}, train)  # as a run with KD sees them
        settings.pop("alpha")
        student_data.check_targets(dataclasses.replace(train, **settings),
                                   teacher.topk if teacher.topk is not None else teacher.logits,
                                   mixed=stored is not None and stored.mixes is not None)
    return inputs
