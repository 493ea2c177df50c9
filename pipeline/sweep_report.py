"""A sweep's results, rebuilt from its Optuna storage (finished or still running).

Per config, over its seeds: mean, sample std and a 95% Student-t interval of the best-epoch validation
accuracy. The chosen config is the best mean validation accuracy; test accuracy is read for that config
only (reading test for every config invites choosing on it). When the sweep has alpha = 0 configs, the
teacher's gain: the best distilled config minus its alpha = 0 twin (teacher_gain), and, when the sweep searches
the loss, the same per loss: each loss's best config (chosen on validation among its own) minus its twin, test
included (loss_gains; one arm per loss, as a table of methods reports them). Written next to the study:
results.csv (one row per config), results.json (configs, every run, the choice) and, when the sweep
varies both T and alpha and matplotlib is installed, heatmap.png of mean validation accuracy over T x alpha.

A trial the storage calls RUNNING is reported by what the locks say: running while a process holds its
run folder's lock (or, on this host, while its worker's pid lives); "interrupted" when its worker is gone,
which a rerun of the sweep continues from the run's last checkpoint.
"""

from __future__ import annotations

import csv
import io
import math
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from .config import TRAIN_DEFAULTS
from .loss import own_settings
from . import files, locking
from .errors import KdpipeError
from .stats import mean_std_ci, paired, welch


@dataclass
class ConfigRow:
    key: str
    params: dict
    seeds: list[int]
    validation: list[float]
    pruned: int
    val_mean: float = 0.0
    val_std: float = 0.0
    val_ci95: float = math.nan
    test: list[float] | None = None  # filled for the chosen config only

    def __post_init__(self):
        self.val_mean, self.val_std, self.val_ci95 = mean_std_ci(self.validation)

    def test_mean_std(self) -> tuple[float, float] | None:
        """Test accuracy over seeds, mean and std (the chosen config's, reported not used); None without it."""
        return mean_std_ci(self.test)[:2] if self.test else None


@dataclass
class SweepSummary:
    out: Path
    study_name: str
    spec: dict
    rows: list[ConfigRow]  # complete configs, best mean validation accuracy first
    best: ConfigRow | None
    counts: dict  # trials per state
    epochs: dict  # run, planned (for pruning's savings)
    seconds: float  # summed epoch time of every run
    teacher_gain: dict | None = None  # the best distilled config against its alpha = 0 twin (teacher_gain())
    loss_gains: dict | None = None  # per loss searched: its best config against its twin (loss_gains())
    files: list[Path] = field(default_factory=list)
    unwritten: list[str] = field(default_factory=list)  # files that could not be written (a read-only folder), why
    interrupted: list[str] = field(default_factory=list)  # run folders of RUNNING trials whose worker is gone


def build(out: Path, write: bool = True) -> SweepSummary:
    """Summarise the sweep in `out` from its storage; write results.csv/json (and heatmap.png). A plan's study
    (kdpipe sweep --plan) is summarised by study_report.build instead (a StudySummary)."""
    out = Path(out)
    record, study = open_study(out)
    trials = study.get_trials(deepcopy=False)
    counts, interrupted = _trial_states(trials, out, record["spec"])
    if "plan" in record["spec"]:  # kdpipe sweep --plan
        from . import study_report

        return study_report.build(out, study, counts, interrupted, write=write)
    groups, epochs, seconds = _group_runs(trials, record["spec"]["train"].get("epochs", TRAIN_DEFAULTS["epochs"]))
    rows = [ConfigRow(key, g["params"], [r["seed"] for r in g["runs"]], [r["validation"] for r in g["runs"]],
                      g["pruned"]) for key, g in groups.items() if g["runs"]]
    rows.sort(key=lambda r: (-r.val_mean, r.key))
    best = rows[0] if rows else None
    if best is not None:
        best.test = [r["test"] for r in groups[best.key]["runs"] if r.get("test") is not None] or None
    runs = {key: g["runs"] for key, g in groups.items()}
    summary = SweepSummary(out, record["study_name"], record["spec"], rows, best, counts, epochs, seconds,
                           teacher_gain(rows, runs), loss_gains(rows, runs, record["spec"]["train"].get("loss", "kd")),
                           interrupted=interrupted)
    if write:
        summary.files, summary.unwritten = _write(summary)
    return summary


def open_study(out: Path) -> tuple[dict, object]:
    """The sweep's recorded spec and its Optuna study."""
    import optuna

    from .sweep import load_spec, open_storage

    record = load_spec(out)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=record["study_name"], storage=open_storage(record["storage"], out))
    except KeyError:
        raise KdpipeError(f"{out}: study {record['study_name']!r} is not in its storage yet; start the sweep") from None
    return record, study


def _trial_states(trials: list, out: Path, spec: dict) -> tuple[dict, list]:
    """Trials per state (a running trial whose worker is gone counts as interrupted), and the interrupted runs."""
    from optuna.trial import TrialState

    counts, interrupted = {}, []
    for t in trials:
        if t.state == TrialState.FAIL and "duplicate" in t.user_attrs:
            continue  # a claim that stepped back, not a result
        state = t.state.name.lower()
        if t.state == TrialState.RUNNING:
            alive, names = worker_alive(t, out, spec)
            if not alive:
                state = "interrupted"
                interrupted += names
        counts[state] = counts.get(state, 0) + 1
    return counts, interrupted


def _group_runs(trials: list, default_epochs: int) -> tuple[dict, dict, float]:
    """Finished runs grouped by config (pruned trials counted, not kept), epochs run and planned, seconds."""
    from optuna.trial import TrialState

    groups: dict[str, dict] = {}
    epochs, seconds = {"run": 0, "planned": 0}, 0.0
    for t in trials:
        if t.state not in (TrialState.COMPLETE, TrialState.PRUNED):
            continue
        params = {k: v for k, v in t.params.items() if k != "seed"}
        runs = t.user_attrs.get("runs", [])
        for r in runs:
            epochs["run"] += r["epochs_run"]
            epochs["planned"] += params.get("epochs", default_epochs)
            seconds += r["seconds"]
        g = groups.setdefault(t.user_attrs["config"], {"params": params, "runs": [], "pruned": 0})
        if t.state == TrialState.PRUNED:
            g["pruned"] += 1
        else:
            g["runs"].extend(runs)
    return groups, epochs, seconds


def worker_alive(trial, out: Path, spec: dict) -> tuple[bool, list[str]]:
    """Whether a RUNNING trial's worker still works on it, and the trial's run folder names. A process
    holding one of its run folders' locks (locking.held) is alive, wherever it runs; otherwise a worker on
    this host is judged by its pid, and one on another host is gone once its run folder exists unlocked
    (before that folder exists there is nothing to tell by, and it counts as running)."""
    config, point = trial.user_attrs.get("config"), trial.user_attrs.get("point")
    if spec.get("sampler") == "tpe":
        names = [f"{config}-seed{seed}" for seed in spec.get("seeds", [])] if config else []
    else:
        names = [point] if point else []
    folders = [out / "runs" / name for name in names]
    if any(locking.held(f) for f in folders):
        return True, names
    owner = trial.user_attrs.get("owner") or {}
    if owner.get("host") == socket.gethostname() and owner.get("pid"):
        try:
            os.kill(owner["pid"], 0)
        except ProcessLookupError:
            return False, names
        except PermissionError:  # someone else's live process
            pass
        return True, names
    return not any(f.is_dir() for f in folders), names


def teacher_gain(rows: list[ConfigRow], runs: dict[str, list[dict]]) -> dict | None:
    """Does the teacher help? The best config with alpha > 0 (rows are best first) against its twin: the
    same settings with alpha = 0 (any temperature: it changes nothing there). Differences of best-epoch
    validation accuracy, Welch's 95 % interval and paired by seed (a seed fixes initial weights, batch
    order and dropout in both). The distilled config won on validation against the others, so its
    validation gap is flattered by that choice. The test gap is not; it is given when the distilled config
    is the chosen one (test is read for the chosen config only, here as a difference). None without a pair."""
    distilled = next((r for r in rows if r.params.get("alpha", 0) > 0), None)
    if distilled is None:
        return None
    return _against_twin(distilled, rows, runs, ("validation", "test") if distilled is rows[0] else ("validation",))


def loss_gains(rows: list[ConfigRow], runs: dict[str, list[dict]], base_loss: str) -> dict | None:
    """When the sweep searched the loss: per loss, its best config with alpha > 0 (chosen on validation among
    that loss's configs; rows are best first) against its alpha = 0 twin, as teacher_gain, with test for each:
    one arm per loss, each chosen on validation and reported on test once, the way a table of methods reads.
    None when fewer than two losses ran."""
    best = {}
    for r in rows:
        if r.params.get("alpha", 0) > 0:
            best.setdefault(r.params.get("loss", base_loss), r)
    if len(best) < 2:
        return None
    return {loss: _against_twin(r, rows, runs, ("validation", "test")) for loss, r in best.items()}


def _against_twin(distilled: ConfigRow, rows: list[ConfigRow], runs: dict[str, list[dict]],
                  splits: tuple[str, ...]) -> dict | None:
    """`distilled` minus its twin, the row with the same settings but alpha = 0, on `splits`: the gap of the
    means, Welch's 95 % interval, and the gap paired by seed with its interval. None without a twin."""
    def settings(r: ConfigRow) -> dict:  # what a twin shares: not alpha, T, the loss or its own settings
        return {k: v for k, v in r.params.items() if k not in ("alpha", "temperature", "loss", *own_settings())}

    twins = [r for r in rows if r.params.get("alpha") == 0 and settings(r) == settings(distilled)]
    if not twins:
        return None
    twin = next((r for r in twins if r.params.get("temperature") in (None, distilled.params.get("temperature"))),
                twins[0])
    out = {"distilled": distilled.key, "twin": twin.key}
    for split in splits:
        a, b = ({r["seed"]: r[split] for r in runs[row.key] if r.get(split) is not None} for row in (distilled, twin))
        if not (a and b):
            continue
        gap, pair = welch(list(a.values()), list(b.values())), paired(a, b)
        out[split] = {"gap": mean_std_ci(list(a.values()))[0] - mean_std_ci(list(b.values()))[0],
                      "seeds": [len(a), len(b)], "welch95": gap[1] if gap else None,
                      "paired": {"gap": pair[0], "ci95": pair[1], "seeds": pair[2]} if pair else None}
    return out


def _write(s: SweepSummary) -> tuple[list[Path], list[str]]:
    """results.csv, results.json and heatmap.png; returns those written and, for each that could not be (a
    read-only mount, an archived copy, a full disk), its name and why: the summary stands without them."""
    names = sorted({k for r in s.rows for k in r.params})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([*names, "seeds", "val_mean", "val_std", "val_ci95", "pruned_trials", "chosen", "test_mean", "test_std"])
    for r in s.rows:
        chosen = r is s.best
        test = r.test_mean_std() if chosen else None
        w.writerow([*(r.params.get(n) for n in names), len(r.seeds), f"{r.val_mean:.6f}", f"{r.val_std:.6f}",
                    "" if math.isnan(r.val_ci95) else f"{r.val_ci95:.6f}", r.pruned, int(chosen),
                    f"{test[0]:.6f}" if test else "", f"{test[1]:.6f}" if test else ""])
    writers = {"results.csv": lambda p: files.write_text(p, buf.getvalue()) or p,  # each: the path written, or None
               "results.json": lambda p: files.write_json(p, to_dict(s)) or p,
               "heatmap.png": lambda p: heatmap(s, p)}
    written, unwritten = [], []
    for name, write in writers.items():
        try:
            if (path := write(s.out / name)) is not None:
                written.append(path)
        except OSError as e:
            unwritten.append(f"{name} ({e.strerror or type(e).__name__})")
    return written, unwritten


def to_dict(s: SweepSummary) -> dict:
    def row(r: ConfigRow) -> dict:
        d = {"config": r.key, "params": r.params, "seeds": r.seeds, "validation_accuracy": r.validation,
             "val_mean": r.val_mean, "val_std": r.val_std, "val_ci95": None if math.isnan(r.val_ci95) else r.val_ci95,
             "pruned_trials": r.pruned}
        return d

    best = None
    if s.best is not None:
        best = {**row(s.best), "chosen_on": "validation (mean over seeds)", "test_accuracy": s.best.test}
        if s.best.test:
            m, sd, ci = mean_std_ci(s.best.test)
            best.update(test_mean=m, test_std=sd, test_ci95=None if math.isnan(ci) else ci)
    return {"study_name": s.study_name, "spec": s.spec, "trials": s.counts, "epochs": s.epochs,
            "train_seconds": round(s.seconds, 2), "configs": [row(r) for r in s.rows], "best": best,
            "teacher_gain": s.teacher_gain, "loss_gains": s.loss_gains, "interrupted": s.interrupted}


def heatmap(s: SweepSummary, path: Path) -> Path | None:
    """Mean validation accuracy over T x alpha (per cell, the best config over the other searched
    settings). None when the sweep does not vary both, or matplotlib (the `plot` extra) is missing."""
    temps = sorted({r.params["temperature"] for r in s.rows if "temperature" in r.params})
    alphas = sorted({r.params["alpha"] for r in s.rows if "alpha" in r.params})
    if len(temps) < 2 or len(alphas) < 2:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    import numpy as np

    grid = np.full((len(alphas), len(temps)), np.nan)
    for r in s.rows:
        if "alpha" not in r.params:
            continue
        i = alphas.index(r.params["alpha"])
        for j in [temps.index(r.params["temperature"])] if "temperature" in r.params else range(len(temps)):
            grid[i, j] = np.nanmax([grid[i, j], r.val_mean])  # alpha = 0 runs once, for every T
    fig, ax = plt.subplots(figsize=(1.2 * len(temps) + 2.5, 0.8 * len(alphas) + 2))
    im = ax.imshow(grid * 100, cmap="viridis", origin="lower", aspect="auto")
    ax.set_xticks(range(len(temps)), [f"{t:g}" for t in temps])
    ax.set_yticks(range(len(alphas)), [f"{a:g}" for a in alphas])
    ax.set_xlabel("temperature T")
    ax.set_ylabel("alpha (weight of the KD term)")
    for i in range(len(alphas)):
        for j in range(len(temps)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j] * 100:.1f}", ha="center", va="center",
                        color="white" if grid[i, j] < np.nanmean(grid) else "black", fontsize=9)
    fig.colorbar(im, ax=ax, label="mean validation accuracy (%)")
    ax.set_title(f"{s.study_name}: mean over seeds, best over other settings", fontsize=9)
    fig.tight_layout()
    with files.replacing(path, suffix=".png") as tmp:  # the suffix tells matplotlib the format
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return path
