"""A sweep's results, rebuilt from its Optuna storage (finished or still running).

Per config, over its seeds: mean, sample std and a 95% Student-t interval of the best-epoch validation
accuracy. The chosen config is the best mean validation accuracy; test accuracy is read for that config
only (reading test for every config invites choosing on it). Written next to the study:
results.csv (one row per config), results.json (configs, every run, the choice) and, when the sweep
varies both T and alpha and matplotlib is installed, heatmap.png of mean validation accuracy over T x alpha.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import KdpipeError

# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (beyond: the normal's 1.96)
T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def mean_std_ci(values: list[float]) -> tuple[float, float, float]:
    """Mean, sample standard deviation (ddof 1; 0 for one value) and the half-width of a 95% t-interval
    of the mean (nan for one value: one seed says nothing about the spread)."""
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0, math.nan
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, std, t975(n - 1) * std / math.sqrt(n)


def t975(dof: float) -> float:
    """Student t's 97.5 % quantile at `dof` (Welch's are fractional): linear in 1/dof between the tabulated
    integers, and between 30 and the normal limit beyond (within 0.002 of the exact quantile from 2 on)."""
    if dof <= 1:
        return T95[0]
    lo = min(int(dof), len(T95))
    upper, t_upper = (lo + 1, T95[lo]) if lo < len(T95) else (math.inf, 1.96)
    w = (1 / lo - 1 / dof) / (1 / lo - 1 / upper)
    return T95[lo - 1] + w * (t_upper - T95[lo - 1])


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
    files: list[Path] = field(default_factory=list)


def build(out: Path, write: bool = True) -> SweepSummary:
    """Summarise the sweep in `out` from its storage; write results.csv/json (and heatmap.png)."""
    from optuna.trial import TrialState

    from .sweep import load_spec, open_storage

    out = Path(out)
    record = load_spec(out)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=record["study_name"], storage=open_storage(record["storage"], out))
    except KeyError:
        raise KdpipeError(f"{out}: study {record['study_name']!r} is not in its storage yet; start the sweep") from None
    trials = study.get_trials(deepcopy=False)
    counts = {}
    for t in trials:
        if t.state == TrialState.FAIL and "duplicate" in t.user_attrs:
            continue  # a claim that stepped back, not a result
        counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
    groups: dict[str, dict] = {}
    epochs_run = epochs_planned = 0
    seconds = 0.0
    for t in trials:
        if t.state not in (TrialState.COMPLETE, TrialState.PRUNED):
            continue
        params = {k: v for k, v in t.params.items() if k != "seed"}
        runs = t.user_attrs.get("runs", [])
        for r in runs:
            epochs_run += r["epochs_run"]
            epochs_planned += params.get("epochs", record["spec"]["train"]["epochs"])
            seconds += r["seconds"]
        g = groups.setdefault(t.user_attrs["config"], {"params": params, "runs": [], "pruned": 0})
        if t.state == TrialState.PRUNED:
            g["pruned"] += 1
        else:
            g["runs"].extend(runs)
    rows = [ConfigRow(key, g["params"], [r["seed"] for r in g["runs"]], [r["validation"] for r in g["runs"]],
                      g["pruned"]) for key, g in groups.items() if g["runs"]]
    rows.sort(key=lambda r: (-r.val_mean, r.key))
    best = rows[0] if rows else None
    if best is not None:
        best.test = [r["test"] for r in groups[best.key]["runs"] if r.get("test") is not None] or None
    summary = SweepSummary(out, record["study_name"], record["spec"], rows, best, counts,
                           {"run": epochs_run, "planned": epochs_planned}, seconds)
    if write:
        summary.files = _write(summary)
    return summary


def _atomic_write(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data if isinstance(data, bytes) else data.encode())
    os.replace(tmp, path)


def _write(s: SweepSummary) -> list[Path]:
    names = sorted({k for r in s.rows for k in r.params})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([*names, "seeds", "val_mean", "val_std", "val_ci95", "pruned_trials", "chosen", "test_mean", "test_std"])
    for r in s.rows:
        chosen = r is s.best
        test = mean_std_ci(r.test) if chosen and r.test else None
        w.writerow([*(r.params.get(n) for n in names), len(r.seeds), f"{r.val_mean:.6f}", f"{r.val_std:.6f}",
                    "" if math.isnan(r.val_ci95) else f"{r.val_ci95:.6f}", r.pruned, int(chosen),
                    f"{test[0]:.6f}" if test else "", f"{test[1]:.6f}" if test else ""])
    files = [s.out / "results.csv", s.out / "results.json"]
    _atomic_write(files[0], buf.getvalue())
    _atomic_write(files[1], json.dumps(to_dict(s), indent=2))
    png = heatmap(s, s.out / "heatmap.png")
    return files + ([png] if png else [])


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
            "train_seconds": round(s.seconds, 2), "configs": [row(r) for r in s.rows], "best": best}


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
        i, j = alphas.index(r.params["alpha"]), temps.index(r.params["temperature"])
        grid[i, j] = np.nanmax([grid[i, j], r.val_mean])
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
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path
