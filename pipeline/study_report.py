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

from . import files, stats
from .errors import KdpipeError
from .stats import mean_std_ci

SPLITS = ("validation", "test")


@dataclass
class ArmPoint:
    """One arm at one budget (one config of it, when the arm searches): its finished runs by seed."""
    arm: str
    budget: int
    config: str
    params: dict
    runs: dict[int, dict]  # seed -> the run's summary (sweep.run_one, or an imported record's)

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
    summary.comparisons = compare_all(summary)
    summary.best = best_arms(points)
    if write:
        summary.files = _write(summary)
    return summary


# ------------------------------------------------------------------------------------------ comparisons


def _arm_point(s: StudySummary, arm: str, budget: int) -> ArmPoint | None:
    """An arm at a budget; of a searching arm, its config with the best mean validation accuracy."""
    found = [p for p in s.points if p.arm == arm and p.budget == budget and p.mean_sd("validation")]
    return max(found, key=lambda p: p.mean_sd("validation")[0]) if found else None


def _rule_value(run: dict, rule: str | None, split: str) -> float | None:
    """A run's accuracy on `split` at the epoch `rule` chose (None: the run's own choice). run.json records
    the other rule's epoch and its figures (train_student); an imported run has only its own choice."""
    if rule is None or rule == run.get("best_epoch_rule"):
        return run.get(split)
    other = run.get("other_rule") or {}
    return other.get(split) if other.get("rule") == rule else None


def _correct(s: StudySummary, point: ArmPoint, seed: int, split: str):
    """Run `seed` of `point`: the ids and per-image correctness of its chosen epoch on `split`, from its run
    folder's predictions (None when it has none: an imported run, or one from before they were kept)."""
    run_dir = s.out / "runs" / f"{point.config}-seed{seed}"
    if point.runs[seed].get("imported") or not (run_dir / "predictions" / f"{split}.parquet").exists():
        return None
    from .run_folder import read_predictions

    try:
        p = read_predictions(run_dir, split)
    except (OSError, KdpipeError):
        return None
    return p.ids, p.correct


def _images(s: StudySummary, a: ArmPoint, b: ArmPoint, seeds: list[int], split: str):
    """(S, N) correctness of both arms, rows paired by seed and columns by image id; None where a run lacks
    its predictions or the runs saw other images."""
    import numpy as np

    rows = {}
    for side, point in (("a", a), ("b", b)):
        for seed in seeds:
            got = _correct(s, point, seed, split)
            if got is None:
                return None
            rows[side, seed] = dict(zip(*got))
    ids = sorted(rows["a", seeds[0]])
    if any(sorted(r) != ids for r in rows.values()):
        return None
    return tuple(np.array([[rows[side, seed][i] for i in ids] for seed in seeds]) for side in ("a", "b"))


def compare(s: StudySummary, c: dict) -> dict:
    """One comparison of the plan: arm - against, paired by seed. The mean difference with its 95 % paired t
    interval over seeds, its p-value by the plan's test (one-sided or two-sided as declared) and the exact
    sign-flip p beside it, and, where every paired run kept its per-image predictions, the 95 % paired
    bootstrap interval over seeds and images (stats.paired_bootstrap)."""
    out = {"key": c["key"], "primary": c["primary"], "arm": c["arm"], "against": c["against"], "budget": c["budget"],
           "split": c["split"], "test": c["test"], "alternative": c["alternative"], "level": c["level"],
           "rule": c.get("rule"), "note": c.get("note", ""), "refute_below_pp": c.get("refute_below_pp"),
           "planned_pairs": c.get("planned_pairs"), "pairs": 0, "verdict": None}
    a, b = _arm_point(s, c["arm"], c["budget"]), _arm_point(s, c["against"], c["budget"])
    if a is None or b is None:
        return out
    va = {k: v for k, r in a.runs.items() if (v := _rule_value(r, c.get("rule"), c["split"])) is not None}
    vb = {k: v for k, r in b.runs.items() if (v := _rule_value(r, c.get("rule"), c["split"])) is not None}
    seeds = sorted(va.keys() & vb.keys())
    out.update(pairs=len(seeds), seeds=seeds, diffs=[va[k] - vb[k] for k in seeds])
    if not seeds:
        return out
    diffs = out["diffs"]
    out["t95"] = stats.paired_t(diffs, 0.95, "two-sided").to_dict()
    out["sign_flip_p"] = stats.sign_flip_p(diffs, c["alternative"])
    out["t_p"] = stats.paired_t_p(diffs, c["alternative"]) if len(seeds) > 1 else None
    out["p"] = out["t_p"] if c["test"] == "paired-t" else out["sign_flip_p"]
    images = _images(s, a, b, seeds, c["split"]) if c.get("rule") is None else None
    out["bootstrap95"] = stats.paired_bootstrap(*images, level=0.95).to_dict() if images is not None else None
    if images is None:
        out["no_bootstrap"] = "not every paired run kept its per-image predictions (imported runs and runs of a kdpipe before they were kept have none)" \
            if c.get("rule") is None else "predictions are kept for the chosen epoch only"
    out["verdict"] = verdict(out)
    return out


def verdict(r: dict) -> str | None:
    """The pre-registered verdict of a confirmatory plan's primary comparison (plan.Comparison.refute_below_pp):
    None for an exploratory plan, for the other comparisons, and before every planned pair has run (an interim
    look decides nothing)."""
    if not r["primary"] or r["refute_below_pp"] is None or r.get("p") is None \
            or (r["planned_pairs"] is not None and r["pairs"] < r["planned_pairs"]):
        return None
    confirmed = r["p"] < r["level"]
    refuted = 100 * r["t95"]["high"] < r["refute_below_pp"]
    if confirmed and refuted:
        return "CONFIRMED, smaller than claimed"
    return "CONFIRMED" if confirmed else "REFUTED" if refuted else "INCONCLUSIVE"


def verdict_line(r: dict) -> str:
    """One sentence: what the primary comparison decided, or why it has not decided yet."""
    if r["verdict"] is None:
        return (f"No verdict yet: {r['pairs']} of {r['planned_pairs'] or 'the'} planned pairs have run; the plan "
                "decides once all have (an interim look decides nothing).")
    t = r["t95"]
    size = f"{100 * t['mean']:+.1f} pp (95 % t interval {100 * t['low']:+.1f} to {100 * t['high']:+.1f}) over {r['pairs']} pairs"
    p = f"{r['test']} p = {r['p']:.3f} {'<' if r['p'] < r['level'] else '≥'} {r['level']:g}"
    below = "lies" if 100 * t["high"] < r["refute_below_pp"] else "does not lie"
    return (f"Verdict of the primary comparison, {r['key']}: **{r['verdict']}**: {size}; {p}; the interval {below} "
            f"below {r['refute_below_pp']:+g} pp.")


def compare_all(s: StudySummary) -> list[dict]:
    """Every comparison of the plan, with Holm's adjusted p over those that have a p-value (the family)."""
    rows = [compare(s, c) for c in s.plan.get("comparisons", [])]
    family = {r["key"]: r["p"] for r in rows if r.get("p") is not None}
    adjusted = stats.holm(family) if family else {}
    for r in rows:
        r["holm_p"] = adjusted.get(r["key"])
    return rows


def best_arms(points: list[ArmPoint]) -> dict | None:
    """What validation says about the best arms: the arm (at a budget) with the best mean validation accuracy,
    and every other whose difference from it is within that difference's own standard error (paired by seed
    over the seeds both ran, else Welch's): validation cannot separate those, so none is named the winner."""
    import math as m

    ranked = sorted((p for p in points if p.mean_sd("validation")), key=lambda p: -p.mean_sd("validation")[0])
    if not ranked:
        return None
    best = ranked[0]
    tied = []
    for p in ranked[1:]:
        a, b = best.values("validation"), p.values("validation")
        common = sorted(a.keys() & b.keys())
        if len(common) >= 2:
            d = [a[k] - b[k] for k in common]
            gap, sd = mean_std_ci(d)[:2]
            se = sd / m.sqrt(len(d))
        elif min(len(a), len(b)) >= 2:
            (ma, sa, _), (mb, sb, _) = mean_std_ci(list(a.values())), mean_std_ci(list(b.values()))
            gap, se = ma - mb, m.sqrt(sa ** 2 / len(a) + sb ** 2 / len(b))
        else:
            continue
        if abs(gap) <= se:
            tied.append({"arm": p.config, "gap": gap, "se": se})
    return {"best": best.config, "validation": best.mean_sd("validation")[0], "not_separated": tied}


def comparison_lines(s: StudySummary) -> list[str]:
    lines = []
    for r in s.comparisons:
        head = f"{'**primary** ' if r['primary'] else ''}{r['key']}"
        if not r["pairs"]:
            lines.append(f"- {head}: no paired runs yet")
            continue
        t = r["t95"]
        text = f"- {head}: {100 * t['mean']:+.1f} pp over {r['pairs']} paired seeds"
        if r["pairs"] > 1:
            text += f", 95 % t interval {100 * t['low']:+.1f} to {100 * t['high']:+.1f} pp"
        if r["bootstrap95"]:
            bs = r["bootstrap95"]
            text += f", 95 % interval over seeds and images {100 * bs['low']:+.1f} to {100 * bs['high']:+.1f} pp"
        else:
            text += " (seeds only*)"
        side = {"greater": "one-sided, arm better", "less": "one-sided, arm worse", "two-sided": "two-sided"}[r["alternative"]]
        if r["t_p"] is not None:
            text += f"; paired t p = {r['t_p']:.3f} ({side})"
        text += f", exact sign-flip p = {r['sign_flip_p']:.3f}"
        if r["holm_p"] is not None:
            text += f", Holm-adjusted over the plan's {len([c for c in s.comparisons if c.get('holm_p') is not None])}" \
                    f" comparisons p = {r['holm_p']:.3f}"
        if r["primary"]:
            verdict = "no p-value with one pair" if r["p"] is None else \
                f"p {'below' if r['p'] < r['level'] else 'not below'} the level"
            text += f". The primary test ({r['test']}, level {r['level']:g}): {verdict}"
        if r["note"]:
            text += f" [{r['note']}]"
        lines.append(text)
    return lines


def best_lines(s: StudySummary) -> list[str]:
    if not s.best:
        return []
    b = s.best
    if b["not_separated"]:
        others = ", ".join(f"{t['arm']} ({100 * t['gap']:+.1f} pp, SE {100 * t['se']:.1f})" for t in b["not_separated"])
        return [f"Validation cannot separate the best arms: {b['best']} ({100 * b['validation']:.1f} %) and {others} "
                "are within one standard error of each other; no winner is named."]
    return [f"Chosen on validation: {b['best']} ({100 * b['validation']:.1f} %), no other arm within one standard "
            "error of it."]


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
    primary = next((r for r in s.comparisons if r["primary"]), None)
    if primary is not None and primary["refute_below_pp"] is not None:  # a confirmatory plan
        lines += [verdict_line(primary), ""]  # first: a reader of the first lines knows what the study decided
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
    if s.comparisons:
        lines += ["Comparisons (arm − against, paired by seed; test accuracy of each run's epoch chosen on "
                  "validation; intervals are 95 %):", "", *comparison_lines(s), ""]
        note = next((r["no_bootstrap"] for r in s.comparisons if r.get("no_bootstrap")), None)
        if note:
            lines += [f"*seeds only: no interval over images, {note}.", ""]
    lines += best_lines(s) + ([""] if s.best else [])
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
    of_twin = {}  # a twin is drawn in the colour of the first arm it twins
    for a, t in twins.items():
        if t:
            of_twin.setdefault(t, a)
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
