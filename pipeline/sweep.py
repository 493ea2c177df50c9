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
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from . import files, student, student_data, sweep_storage, train_student
from .config import DATA_ROOT, PRUNERS, SAMPLERS, SweepConfig, TrainConfig, applicable, comparable
from .loss import own_settings
from .settings import value_type
from .sweep_budget import Budget
from .errors import KdpipeError
from .plan import Plan, describe

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


def grid_points(cfg: SweepConfig) -> Iterator[Point]:
    """Every config of the product x every seed, except that alpha = 0 runs once per setting of the rest:
    without the KD term the temperature and the loss change nothing, so they are left out of those configs;
    likewise a loss's own settings (e.g. --dkd-beta) are left out of the other losses' configs (applicable).
    Yielded lazily, in product order: a config at its first occurrence, where each setting it leaves out holds
    its first value. Nothing holds the whole list: a grid is counted and refused without it (cfg.grid_trials,
    config.GRID_LIMIT), and a worker reads it afresh, as far as the first free points, before each trial
    (_claim_points)."""
    dims = cfg.dims
    names = sorted(dims)
    for values in itertools.product(*(dims[n].choices for n in names)):
        c = applicable(dict(zip(names, values)), cfg.train)
        if all(v == dims[n].choices[0] for n, v in zip(names, values) if n not in c):
            yield from (Point(c, seed) for seed in cfg.seeds)


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


def claim_folder(out: Path, study_name: str, storage: str | None, spec: dict, note: dict | None = None) -> None:
    """Write sweep.json (how to reopen the study) once, atomically; later workers check it matches. `note`: what
    else it records (a grid's size, _grid_record)."""
    from .locking import make_folder

    make_folder(out)  # a file, a broken link or an unwritable place: one line naming --out
    other = next((p.name for p in out.iterdir() if p.suffix == ".parquet" or p.name in ("run.json", "checkpoint.pt")),
                 None)
    if other:
        raise KdpipeError(f"--out {out} holds {other}: it is a cache or a train-student run, not a sweep; choose "
                          "another --out")
    record = {"study_name": study_name, "storage": storage, "spec": json.loads(json.dumps(spec)), **(note or {})}
    path = out / SPEC_FILE
    tmp = files.temporary(path)
    tmp.write_text(json.dumps(record, indent=2))
    try:
        os.link(tmp, path)  # atomic create-if-absent: of two workers starting together, one writes
    except FileExistsError:
        saved = load_spec(out)
        _same_storage(saved, storage, out)
        if "train" in saved["spec"] and "train" in record["spec"]:
            record["spec"] = _as_saved(record["spec"], saved["spec"])
        if saved["spec"] != record["spec"] or saved["study_name"] != record["study_name"]:
            differs = sorted(k for k in record["spec"] if record["spec"][k] != saved["spec"].get(k))
            raise KdpipeError(f"--out {out} holds a sweep with other settings ({', '.join(differs) or 'study name'});"
                              " rerun it with the same flags to resume, or choose another --out") from None
    finally:
        tmp.unlink(missing_ok=True)


def _check_storage(storage: str | None, out: Path) -> None:
    """Open an RDB --storage before anything records it: a refused URL (a typo, a missing driver) written into
    sweep.json would bind the folder to a storage that never opens. A sweep folder already recording another
    storage is refused here too, before the new one is touched (it would create a second copy of the study)."""
    if (out / SPEC_FILE).exists():
        _same_storage(load_spec(out), storage, out)
    elif storage is not None and storage.startswith("sqlite:///") and (
            ":memory:" in storage or not Path(storage[len("sqlite:///"):]).is_absolute()):
        raise KdpipeError(f"--storage {storage}: an SQLite file is named by a path relative to the folder the "
                          "command runs in (or held in memory), so a rerun elsewhere would open another study; give "
                          "an absolute path, sqlite:////abs/path/study.db (four slashes)")
    if storage is not None:
        open_storage(storage, out)


def _same_storage(saved: dict, storage: str | None, out: Path) -> None:
    """A sweep folder is one study in one storage: refuse a rerun naming another one."""
    if saved["storage"] != storage:
        def name(url):
            return f"--storage {url}" if url else f"the journal file {out / 'study.journal'} (no --storage)"

        raise KdpipeError(f"--out {out} holds a sweep stored in {name(saved['storage'])}, not {name(storage)}; "
                          "rerun it with the storage it was started with, or choose another --out")


def _grid_record(cfg: SweepConfig) -> dict:
    """sweep.json's note of a grid's size, and whether --large-grid let it pass the limit."""
    return {} if cfg.grid_trials is None else {"grid_trials": cfg.grid_trials, "large_grid": cfg.large_grid}


def load_spec(out: Path) -> dict:
    """sweep.json of the sweep folder `out`: how to reopen its study, and its settings."""
    path = Path(out) / SPEC_FILE
    if not path.exists():
        raise KdpipeError(f"{out}: no {SPEC_FILE}; pass a folder written by kdpipe sweep")
    try:
        record = json.loads(path.read_text())
        _check_record(record)
    except (ValueError, OSError) as e:  # JSONDecodeError is a ValueError
        raise KdpipeError(f"{path} is damaged ({type(e).__name__}: {e}); it is written once when the sweep starts: "
                          "restore it, or start the sweep again in another --out") from None
    return record


def _check_record(record) -> None:
    """sweep.json's shape: its keys, and each recorded setting of the types its config field holds (a train
    setting a sweep of an earlier kdpipe lacks is taken at its default, as config.comparable does). Raises
    ValueError naming the first thing out of place."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(what)

    need(isinstance(record, dict) and all(k in record for k in ("study_name", "storage", "spec")), "a key is missing")
    need(isinstance(record["study_name"], str), "study_name is not text")
    need(record["storage"] is None or isinstance(record["storage"], str), "storage is not a URL")
    spec = record["spec"]
    need(isinstance(spec, dict), "spec is not an object")
    if "plan" in spec:  # kdpipe sweep --plan: the plan's settings live in its study
        need(isinstance(spec["plan"], str), "spec.plan is not a name")
        return
    need(isinstance(spec.get("space"), dict) and all(isinstance(d, dict) for d in spec["space"].values()),
         "spec.space is not an object of dimensions")
    need(isinstance(spec.get("seeds"), list) and all(type(x) is int for x in spec["seeds"]) and spec["seeds"],
         "spec.seeds is not a list of integers")
    need(spec.get("sampler") in SAMPLERS and spec.get("prune") in PRUNERS, "spec.sampler or spec.prune is unknown")
    need(spec.get("trials") is None or type(spec["trials"]) is int, "spec.trials is not an integer")
    need(isinstance(spec.get("train"), dict), "spec.train is not an object")
    for name, value in spec["train"].items():
        need(name not in SETTING_TYPES or _of_type(value, *SETTING_TYPES[name]), f"spec.train.{name} is not of type "
             f"{SETTING_TYPES.get(name, (object,))[0].__name__}")


# TrainConfig's fields as sweep.json holds them: name -> (type, whether null is allowed: `X | None`)
SETTING_TYPES = {f.name: (value_type(TrainConfig, f.name), type(None) in typing.get_args(typing.get_type_hints(
    TrainConfig)[f.name])) for f in dataclasses.fields(TrainConfig)}


def _of_type(value, kind: type, nullable: bool) -> bool:
    """A JSON value read back as a setting of type `kind` (a Path is text; a float may be written as an int)."""
    if value is None:
        return nullable
    if kind is float:
        return type(value) in (int, float)
    if kind is int:
        return type(value) is int
    return isinstance(value, {Path: str}.get(kind, kind))


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


def run_one(cfg: SweepConfig, trial, params: dict, seed: int, out: Path, report_epochs: bool,
            progress: Callable | None, shared: student_data.SharedData, name: str | None = None) -> dict:
    """One train-student run folder (`<out>/runs/<name>`, by default <config>-seed<k>); resumes a folder left by
    a dead worker. Returns its summary."""
    run_dir = out / "runs" / (name or f"{config_key(params)}-seed{seed}")
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
    rule = report.run.get("best_epoch_rule") or {}
    other = rule.get("other_rule_epoch")
    return {"seed": seed, "run": str(run_dir), "pruned": False, "epochs_run": len(report.history),
            "best_epoch": report.best_epoch, "validation": report.validation["accuracy"],
            "test": report.test["accuracy"] if report.test else None,
            "seconds": sum(r["epoch_time_s"] for r in report.history), "best_epoch_rule": rule.get("rule"),
            "other_rule": {"rule": rule.get("other_rule"), "epoch": other,  # reported, never used to choose
                           "validation": report.history[other - 1]["validation"]["accuracy"] if other else None,
                           "test": (rule.get("test_at_other_rule_epoch") or {}).get("accuracy")}}


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


def grid_worker(cfg: SweepConfig, study, out: Path, progress, on_trial, shared: student_data.SharedData,
                budget: Budget) -> None:
    """A grid sweep's worker: claim and run the grid's free points (_claim_points) until none is left."""
    choices = {name: list(d.choices) for name, d in cfg.dims.items()}
    choices["seed"] = list(cfg.seeds)
    _claim_points(study, lambda: grid_points(cfg), lambda p: {"point": p.key, "config": p.config_key},
                  lambda p: cfg, choices, cfg.stale_after_s, out, progress, on_trial, shared, budget)


def _claim_points(study, points: Callable[[], Iterable], attrs: Callable[[Any], dict],
                  config_of: Callable[[Any], SweepConfig], choices: dict | None, stale_after_s: float, out: Path,
                  progress, on_trial, shared: student_data.SharedData, budget: Budget | None = None) -> None:
    """Run free points until none is left. `points()` yields the points afresh, in order (a grid's lazily:
    never held whole); each has a key (its run folder's name), params and a seed; `attrs(point)` are the user
    attributes its trial carries; `config_of(point)` is the sweep it runs under; `choices` (a grid's dimensions)
    records its values as Optuna parameters, None leaves them in the attributes; `budget` (a grid's --hours)
    leaves the points this worker cannot finish in time, and records each trial's pace."""
    from optuna.trial import TrialState

    rng = random.Random(f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}")
    collided = False
    while True:
        fail_stale_trials(study, stale_after_s)
        held = _held_points(study)  # once: each read is a query of every trial on an RDB
        free = (p for p in points() if p.key not in held)
        offered = list(itertools.islice(free, 4)) if budget is None else budget.fitting(study, free, 4)
        queued = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))  # e.g. a dead worker's
        if not offered and not queued:
            return
        if offered:  # the grid runs in order; after a collision, a random pick near the front spreads workers
            point = offered[rng.randrange(len(offered)) if collided else 0]
            study.enqueue_trial({**point.params, "seed": point.seed} if choices is not None else {},
                                user_attrs=attrs(point))
        trial = study.ask()  # pops the oldest waiting trial: this one, or one another worker queued
        key = trial.user_attrs.get("point")
        point = next((p for p in offered if p.key == key), None) or _find(points(), key)
        rivals = [t for t in study.get_trials(deepcopy=False, states=_live_states())
                  if t.number != trial.number and key is not None and t.user_attrs.get("point") == key]
        if point is None or rivals:  # another worker took the queued trial, claimed the point too, or
            # queued it under an older kdpipe whose grid had other points: step back
            trial.set_user_attr("duplicate", rivals[0].number if rivals else "nothing queued")
            study.tell(trial, state=TrialState.FAIL)
            time.sleep(rng.uniform(0.05, 0.5))
            collided = True
            continue
        collided = False
        if budget is not None and not budget.allows(study, point):  # a queued trial other than the one chosen
            trial.set_user_attr("duplicate", "left for later (--hours)")
            study.tell(trial, state=TrialState.FAIL)
            return
        trial.set_user_attr("owner", _owner())
        for name in sorted(point.params.keys() | {"seed"}) if choices is not None else ():
            trial.suggest_categorical(name, choices[name])  # the queued values, recorded as Optuna parameters
        cfg = config_of(point)
        measured = budget.measuring(trial, [out / "runs" / key]) if budget is not None else contextlib.nullcontext()
        with _failing_on_error(study, trial), measured:
            run = run_one(cfg, trial, point.params, point.seed, out, cfg.prune != "none", progress, shared, key)
        result = _finish_trial(study, trial, key, point.params, [point.seed], [run])
        if on_trial:
            on_trial(result, cfg.grid_trials)


def _find(points: Iterable, key: str | None):
    """The point of `key` (None if it is not one), found by a lazy scan: for a trial another worker queued."""
    return next((p for p in points if p.key == key), None) if key is not None else None


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
                runs.append(run_one(cfg, trial, params, seed, out, cfg.prune != "none" and i == 0, progress, shared))
                if runs[-1]["pruned"]:
                    break
        result = _finish_trial(study, trial, key, params, list(cfg.seeds[:len(runs)]), runs)
        if on_trial:
            on_trial(result, cfg.trials)


def _suggest(trial, cfg: SweepConfig) -> dict:
    """A TPE trial's settings, one per dimension; the loss (and alpha) first, so a setting of another loss
    than the one drawn is not sampled and TPE never learns from a value that changed nothing."""
    params, own = {}, own_settings()
    for name, d in sorted(cfg.dims.items(), key=lambda item: (item[0] not in ("alpha", "loss"), item[0])):
        if name in own and params.get("loss", cfg.train.loss) not in own[name]:
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
    _check_storage(cfg.storage, out)
    claim_folder(out, cfg.study_name(), cfg.storage, cfg.spec(), _grid_record(cfg))
    study = open_study(cfg, out, note)
    _same_inputs(study, inputs)
    worker = grid_worker if cfg.sampler == "grid" else _tpe_worker
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
    cache, dataset = shared.get(("source", *student_data.source_key(train)), lambda: student_data.open_source(train))
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


# ------------------------------------------------------------------------------------ a plan's study


PLAN_ATTR = "kdpipe_plan"  # the study's record of its plan: content hash, file, every point's settings
AMENDMENTS_ATTR = "kdpipe_amendments"  # dated, one per change of the plan (points added)


def run_plan(plan: Plan, out: Path | None = None, storage: str | None = None, name: str | None = None,
             stale_after_s: float = 3600.0, progress: Callable | None = None,
             on_trial: Callable[[TrialResult, int], None] | None = None, storage_wait_s: float = 600.0,
             note: Callable[[str], None] | None = None) -> Path:
    """Work on a plan's study (`kdpipe sweep --plan`) until none of its points is left to start: the same
    storage, claims, resume and dead-worker recovery as a grid, one trial per point (arm x budget x seed x
    config), each an ordinary run folder `<out>/runs/<arm>-e<budget>[-<config>]-seed<k>`."""
    import optuna

    out = Path(out) if out is not None else DATA_ROOT / "sweeps" / plan.name
    study_name = name or out.resolve().name
    points = plan.points()
    configs = {}  # (arm, budget) -> the SweepConfig its points run under
    for p in points.values():
        if (p.arm, p.budget) not in configs:
            configs[p.arm, p.budget] = plan.arms[p.arm].sweep(p.budget, plan.base, stale_after_s=stale_after_s)
    shared = student_data.SharedData()
    inputs = {}
    for (arm, _), cfg in configs.items():  # every arm's inputs checked before the folder exists
        if arm not in inputs:
            inputs[arm] = _check_inputs(cfg, shared)
    _check_storage(storage, out)
    claim_folder(out, study_name, storage, {"plan": plan.name})
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=open_storage(storage, out, storage_wait_s, note), study_name=study_name,
                                direction="maximize",
                                load_if_exists=True, sampler=optuna.samplers.RandomSampler())
    record_plan(study, plan, points, _teacher_accuracy(shared, configs.values()))
    _same_arm_inputs(study, inputs)
    if plan.imported:
        import_records(study, plan, points)
    _claim_points(study, points.values, lambda p: {"point": p.key, "config": p.config, "arm": p.arm,
                                                    "budget": p.budget, "seed": p.seed, "params": p.params},
                  lambda p: configs[p.arm, p.budget], None, stale_after_s, out, progress, on_trial, shared)
    return out


def _finished_points(study) -> set[str]:
    from optuna.trial import TrialState

    return {t.user_attrs.get("point") for t in study.get_trials(deepcopy=False,
                                                                  states=(TrialState.COMPLETE, TrialState.PRUNED))}


def record_plan(study, plan: Plan, points: dict, teacher: dict | None = None) -> None:
    """Record the plan in its study by content; a changed plan may add points (a dated amendment, listed in every
    report) but not change or drop one that has a finished trial (refused, one line)."""
    now = {k: p.settings for k, p in points.items()}
    saved = study.user_attrs.get(PLAN_ATTR)
    record = json.loads(json.dumps({**plan.record(), "teacher": teacher or {}, "points": now}))
    if saved is None:
        study.set_user_attr(PLAN_ATTR, {**record, "at": _now()})
        study.set_user_attr(AMENDMENTS_ATTR, [])
        return
    if saved["sha256"] == plan.sha256:
        return
    finished = _finished_points(study)
    for key, old in saved["points"].items():
        new = record["points"].get(key)
        if key in finished and (new is None or comparable(new, old) != old):
            what = "drops it" if new is None else \
                "changes " + ", ".join(sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k)))
            raise KdpipeError(f"{plan.file}: point {key} has a finished trial and this plan {what}; a plan may only "
                              "gain arms, budgets or seeds: restore it, or start the new plan in another --out")
    added = [points[k] for k in record["points"] if k not in saved["points"]]
    changed = sorted(k for k in saved["points"] if k in record["points"] and k not in finished
                     and comparable(record["points"][k], saved["points"][k]) != saved["points"][k])
    dropped = sorted(saved["points"].keys() - now.keys())
    amendment = {"at": _now(), "sha256": plan.sha256, "added": describe(added),
                 "changed_before_their_runs": changed, "dropped": dropped}
    if not (added or changed or dropped):
        amendment["what"] = f"the plan's file changed (sha256 {plan.sha256[:12]}); no point added, changed or dropped"
    study.set_user_attr(AMENDMENTS_ATTR, [*study.user_attrs.get(AMENDMENTS_ATTR, []), amendment])
    study.set_user_attr(PLAN_ATTR, {**record, "at": saved["at"]})


def _teacher_accuracy(shared: student_data.SharedData, configs) -> dict:
    """The teacher's accuracy per split, from the metadata of the first arm's cache that has one (its line in the
    curve); {} when no arm reads a cache."""
    for cfg in configs:
        if cfg.train.cache is not None:
            cache, _ = shared.get(("source", *student_data.source_key(cfg.train)),
                                  lambda: student_data.open_source(cfg.train))
            return {name: split.meta["teacher_accuracy"] for name, split in cache.items()
                    if name != cfg.train.train_split and "teacher_accuracy" in split.meta}
    return {}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _same_arm_inputs(study, inputs: dict[str, dict]) -> None:
    """_same_inputs per arm (each arm reads its own cache): an arm whose inputs changed since one of its trials
    finished is refused; a new arm's are added."""
    saved = study.user_attrs.get("kdpipe_inputs") or {}
    finished = {t.user_attrs.get("arm") for t in study.get_trials(deepcopy=False) if t.user_attrs.get("point")
                in _finished_points(study)}
    for arm, identity in inputs.items():
        if saved.get(arm) not in (None, identity) and arm in finished:
            raise KdpipeError(f"study {study.study_name!r}: arm {arm} was started on other inputs (its cache or "
                              "dataset changed since, by content); restore them to resume it, or choose another --out")
    if {**saved, **inputs} != saved:
        study.set_user_attr("kdpipe_inputs", {**saved, **inputs})


def import_records(study, plan: Plan, points: dict) -> list[str]:
    """Record the run records of an earlier study (the plan's `imported` folder, `E<budget>/<arm>-seed<seed>.json`,
    as the patience study wrote them: benchmarks/results/patience/E*/) as finished trials of their points, so no run is repeated. A
    record whose arm, budget, seed or resolution is not the point's is refused. Returns the points imported."""
    import optuna
    from optuna.trial import TrialState

    folder = plan.base / plan.imported
    earlier = folder / "plan.json"  # the earlier study's own plan: its dated amendments are the study's too
    if earlier.exists() and not study.user_attrs.get("kdpipe_imported_plan"):
        saved = json.loads(earlier.read_text())
        amendments = [{"at": a["at"], "what": a.get("what", ", ".join(a.get("added", []))), "why": a.get("why", ""),
                       "imported_from": str(earlier.relative_to(plan.base))} for a in saved.get("amendments", [])]
        study.set_user_attr(AMENDMENTS_ATTR, [*amendments, *study.user_attrs.get(AMENDMENTS_ATTR, [])])
        study.set_user_attr("kdpipe_imported_plan", {"file": str(earlier.relative_to(plan.base)),
                                                     "written_at": saved.get("written_at")})
    held = _held_points(study)
    done = []
    for key, p in points.items():
        path = folder / f"E{p.budget}" / f"{p.arm}-seed{p.seed}.json"
        if key in held or p.params or not path.exists():
            continue
        r = json.loads(path.read_text())
        size = (p.settings.get("student_config") or {}).get("image_size")
        got = (r.get("arm"), r.get("epochs"), r.get("seed"), r.get("size", size))
        if got != (p.arm, p.budget, p.seed, size):
            raise KdpipeError(f"{path}: a record of arm {got[0]}, {got[1]} epochs, seed {got[2]}, {got[3]} px, not of "
                              f"point {key} ({size} px); fix the plan's `imported` folder or the arm")
        run = {"seed": p.seed, "run": r.get("run_dir"), "pruned": False, "best_epoch_rule": "first",  # the old rule
               "epochs_run": len(r.get("validation_accuracy_per_epoch", [])) or p.budget,
               "best_epoch": r["best_epoch"], "validation": r["validation"]["accuracy"],
               "test": r["test"]["accuracy"] if r.get("test") else None, "seconds": r.get("wall_time_s", 0.0),
               "metrics": {"validation": r["validation"], "test": r.get("test")}}
        study.add_trial(optuna.trial.create_trial(
            state=TrialState.COMPLETE, value=run["validation"],
            user_attrs={"point": key, "config": p.config, "arm": p.arm, "budget": p.budget, "seed": p.seed,
                        "params": {}, "runs": [run], "imported": str(path.relative_to(plan.base))}))
        done.append(key)
    return done
