"""A plan study's report (`kdpipe sweep-report` on a folder of `kdpipe sweep --plan`), from its storage alone.

Per arm and budget, over its seeds: validation and test accuracy of each run's best epoch, mean ± SD (test is
read for every arm: a plan fixes its comparisons before the runs, so nothing is chosen on it). The plan's
comparisons (plan.Plan.comparisons_all: the primary, the declared ones, every arm against its twin at each
budget) come after, and the plan's record: its content hash and every dated amendment. Written next to the
study: results.json, results.md (the same tables) and curve.png (accuracy against epochs per arm, twins
dashed beside their arms, the teacher's accuracy as a line; with matplotlib, the `plot` extra).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from . import files
from .stats import mean_std_ci

SPLITS = ("validation", "test")


@dataclass
class ArmPoint:
    """One arm at one budget (one config of it, when the arm searches): its finished runs by seed."""
    arm: str
    budget: int
    config: str
    params: dict
    runs: dict[int, dict]  # seed -> the run's summary (sweep._run_one, or an imported record's)

    def values(self, split: str) -> dict[int, float]:
        return {s: r[split] for s, r in sorted(self.runs.items()) if r.get(split) is not None}

    def mean_sd(self, split: str) -> tuple[float, float] | None:
        v = list(self.values(split).values())
        return mean_std_ci(v)[:2] if v else None

    def to_dict(self) -> dict:
        out = {"arm": self.arm, "budget": self.budget, "config": self.config, "params": self.params,
               "seeds": sorted(self.runs)}
        for split in SPLITS:
            ms = self.mean_sd(split)
            out[split] = {"per_seed": self.values(split), "mean": ms[0] if ms else None, "sd": ms[1] if ms else None}
        out["imported"] = sorted(s for s, r in self.runs.items() if r.get("imported"))
        return out


@dataclass
class StudySummary:
    out: Path
    study_name: str
    plan: dict  # the study's record of its plan (sweep.PLAN_ATTR)
    amendments: list[dict]
    points: list[ArmPoint]  # by budget, then arm in the plan's order
    counts: dict  # trials per state
    teacher: dict  # split -> the teacher's accuracy (its cache's metadata)
    comparisons: list[dict] = field(default_factory=list)
    best: dict | None = None  # what validation says about the best arms (best_arms)
    interrupted: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


def build(out: Path, study, counts: dict, interrupted: list[str], write: bool = True) -> StudySummary:
    """Summarise a plan's study from its storage; write results.json, results.md and curve.png."""
    from optuna.trial import TrialState

    from .sweep import AMENDMENTS_ATTR, PLAN_ATTR

    plan = study.user_attrs.get(PLAN_ATTR) or {}
    order = list(dict.fromkeys(plan.get("arms", [])))
    groups: dict[str, ArmPoint] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        a = t.user_attrs
        if "arm" not in a or "runs" not in a:
            continue
        g = groups.setdefault(a["config"], ArmPoint(a["arm"], a["budget"], a["config"], a.get("params", {}), {}))
        for r in a["runs"]:
            g.runs.setdefault(r["seed"], {**r, "imported": a.get("imported")})  # a duplicate import: the first
    points = sorted(groups.values(), key=lambda p: (p.budget, order.index(p.arm) if p.arm in order else len(order),
                                                    p.config))
    summary = StudySummary(Path(out), study.study_name, plan, study.user_attrs.get(AMENDMENTS_ATTR, []), points,
                           counts, plan.get("teacher", {}), interrupted=interrupted)
    if write:
        summary.files = _write(summary)
    return summary


def _pct(ms: tuple[float, float] | None) -> str:
    return "-" if ms is None else f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}"


def table(s: StudySummary) -> list[str]:
    """The arms as a Markdown table: per arm and budget, seeds, validation and test mean ± SD (%)."""
    lines = ["| budget (epochs) | arm | twin | seeds | validation % (mean ± SD) | test % (mean ± SD) |",
             "|---|---|---|---|---|---|"]
    twins = s.plan.get("twins", {})
    for p in s.points:
        seeds = ", ".join(map(str, sorted(p.runs)))
        imported = sum(bool(r.get("imported")) for r in p.runs.values())
        note = f" ({imported} imported)" if imported else ""
        lines.append(f"| {p.budget} | {p.config.rsplit('-e', 1)[0] if not p.params else p.config} | "
                     f"{twins.get(p.arm) or '-'} | {seeds}{note} | {_pct(p.mean_sd('validation'))} | "
                     f"{_pct(p.mean_sd('test'))} |")
    return lines


def text(s: StudySummary) -> str:
    """The report as Markdown (results.md; the command line prints the same)."""
    plan = s.plan
    lines = [f"# Study {s.study_name}: plan {plan.get('name')} ({plan.get('file')}, sha256 {plan.get('sha256', '')[:12]},"
             f" recorded {plan.get('at')})", ""]
    if plan.get("description"):
        lines += [plan["description"], ""]
    if s.amendments:
        lines.append("Amendments (each fixed before its own runs):")
        for a in s.amendments:
            what = "; ".join(a.get("added", [])) or a.get("what", "")
            lines.append(f"- {a['at']}: {'added ' if a.get('added') else ''}{what}" +
                         (f" (why: {a['why']})" if a.get("why") else ""))
        lines.append("")
    else:
        lines += ["Amendments: none (the plan as first recorded).", ""]
    counts = ", ".join(f"{v} {k}" for k, v in sorted(s.counts.items())) or "no trials yet"
    lines += [f"Trials: {counts}. Accuracy of each run's best epoch (chosen on validation), mean ± SD over seeds; "
              "test is reported for every arm, and nothing is chosen on it.", "", *table(s), ""]
    if s.teacher:
        lines += ["Teacher: " + ", ".join(f"{k} {100 * v:.1f} %" for k, v in s.teacher.items()), ""]
    if s.interrupted:
        lines += [f"Interrupted (no process holds them; rerun the sweep to continue): {', '.join(s.interrupted)}", ""]
    return "\n".join(lines)


def to_dict(s: StudySummary) -> dict:
    return {"study_name": s.study_name, "plan": {k: v for k, v in s.plan.items() if k != "points"},
            "amendments": s.amendments, "trials": s.counts, "teacher": s.teacher,
            "arms": [p.to_dict() for p in s.points], "comparisons": s.comparisons, "best": s.best,
            "interrupted": s.interrupted}


def _write(s: StudySummary) -> list[Path]:
    written = [s.out / "results.json", s.out / "results.md"]
    files.write_json(written[0], to_dict(s))
    files.write_text(written[1], text(s) + "\n")
    png = curve(s, s.out / "curve.png")
    return written + ([png] if png else [])


def curve(s: StudySummary, path: Path) -> Path | None:
    """Accuracy against epochs, a panel per split: per arm its mean over seeds with a ± SD band, each twin in
    its arm's colour, dashed; the teacher's accuracy as a black line. None with fewer than two budgets or
    without matplotlib (the `plot` extra)."""
    budgets = sorted({p.budget for p in s.points})
    if len(budgets) < 2:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    twins = s.plan.get("twins", {})
    of_twin = {t: a for a, t in twins.items() if t}  # a twin is drawn in the colour of (the first) arm it twins
    arms = list(dict.fromkeys(p.config.rsplit("-seed", 1)[0] if p.params else p.arm for p in s.points))
    leaders = [a for a in arms if a not in of_twin]
    palette = plt.get_cmap("tab10")
    colour = {a: palette(i % 10) for i, a in enumerate(leaders)}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5), sharey=True)
    for ax, split in zip(axes, ("test", "validation")):
        for arm in arms:
            pts = [(p.budget, p.mean_sd(split)) for p in s.points if (p.arm if not p.params else p.config) == arm
                   and p.mean_sd(split) is not None]
            if not pts:
                continue
            xs, ms = [b for b, _ in pts], [100 * m for _, (m, _) in pts]
            sd = [100 * d for _, (_, d) in pts]
            c = colour.get(arm) or colour.get(of_twin.get(arm), "grey")
            ax.plot(xs, ms, "--" if arm in of_twin else "-", marker="o", color=c, label=arm)
            ax.fill_between(xs, [m - d for m, d in zip(ms, sd)], [m + d for m, d in zip(ms, sd)], color=c, alpha=0.08,
                            linewidth=0)
        if split in s.teacher:
            ax.axhline(100 * s.teacher[split], color="black", linestyle=":", linewidth=1, label="teacher")
        ax.set_xscale("log")
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.minorticks_off()
        ax.set_xlabel("epochs")
        ax.set_title(split)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%): mean over seeds, band ± SD")
    axes[1].legend(fontsize=7, ncol=2, loc="lower right")
    fig.suptitle(f"{s.study_name}: arms (solid) and their twins (dashed)")
    fig.tight_layout()
    with files.replacing(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return path
