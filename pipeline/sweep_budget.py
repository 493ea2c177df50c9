"""A worker's time budget (`kdpipe sweep --hours H`), and the pace every trial records for it.

Every finished trial records where and how fast it ran, in its user attribute `pace`: the machine (the CPU's model
or the GPU's name), the precision, the threads, the seconds per epoch of the epochs this worker ran and the seconds
outside them (loading, the test pass, saving). With --hours, a worker starts a trial only when it can finish it in
the time it has left: its epochs still to run (a dead worker's trial continues from its checkpoint) x the seconds
per epoch, plus the time outside epochs, measured on finished trials of the same configuration on the same kind of
machine (CPU or GPU model, precision, threads); a configuration not yet measured there is judged by the slowest one
measured there. With nothing measured on this kind of machine yet, the worker runs one trial to measure it, and
says so. When nothing left fits, it stops and says what it left for later: the same command, here or elsewhere,
runs it.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import time
from pathlib import Path
from typing import Callable, Iterable

from . import run_folder


@functools.lru_cache(maxsize=4)
def machine(device: str, precision: str) -> dict:
    """The kind of machine a pace holds for: what runs the epochs, at which precision, on how many threads."""
    import torch

    from . import runtime

    dev = runtime.resolve_device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else runtime.cpu_model()
    return {"device": name, "precision": runtime.resolve_precision(precision, dev), "threads": torch.get_num_threads()}


def describe(m: dict) -> str:
    return f"{m['device']}, {m['precision']}, {m['threads']} thread{'s' if m['threads'] != 1 else ''}"


def epochs_done(run_dir: Path) -> int:
    """Epochs a run folder already holds (a dead worker's trial continues after them)."""
    try:
        return len(run_folder.read_history(run_dir))
    except (OSError, ValueError):  # none yet, or a line cut short: judged as a trial from its start
        return 0


class Budget:
    """This worker's deadline (None: no --hours) and its judgement of which trials fit before it."""

    def __init__(self, cfg, note: Callable[[str], None] | None = None):
        self.cfg, self.note = cfg, note or (lambda line: None)
        self.deadline = time.monotonic() + cfg.hours * 3600 if cfg.hours else None
        self.started = 0  # trials this worker started
        self._said = set()

    def machine(self) -> dict:
        return machine(self.cfg.train.device, self.cfg.train.precision)

    # ------------------------------------------------------------------ recording

    @contextlib.contextmanager
    def measuring(self, trial, run_dirs: list[Path]):
        """Around a trial's runs: when they finish, record its pace on the trial (before it is told finished)."""
        before = {d: epochs_done(d) for d in run_dirs}
        self.started += 1
        start = time.monotonic()
        yield
        wall = time.monotonic() - start
        ran = {d: run_folder.read_history(d)[n:] for d, n in before.items() if d.is_dir()}
        epochs = [r["epoch_time_s"] for history in ran.values() for r in history]
        runs = max(1, sum(1 for history in ran.values() if history))  # a pruned TPE trial ran one of its seeds
        trial.set_user_attr("pace", {"machine": self.machine(), "epochs": len(epochs),
                                     "seconds_per_epoch": sum(epochs) / len(epochs) if epochs else None,
                                     "outside_epochs_s": max(0.0, wall - sum(epochs)) / runs})

    # ------------------------------------------------------------------ judging

    def _paces(self, study) -> dict[str | None, tuple[float, float]]:
        """Per configuration measured on this kind of machine: (seconds per epoch, seconds outside epochs per
        run), means over its trials; under None, the slowest configuration's."""
        from optuna.trial import TrialState

        here, seen = self.machine(), {}
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
            pace = t.user_attrs.get("pace")
            if pace and pace["machine"] == here and pace["seconds_per_epoch"]:
                seen.setdefault(t.user_attrs.get("config"), []).append(
                    (pace["seconds_per_epoch"], pace["outside_epochs_s"]))
        paces = {k: (sum(s for s, _ in v) / len(v), sum(o for _, o in v) / len(v)) for k, v in seen.items()}
        if paces:
            paces[None] = max(paces.values())
        return paces

    def _cost(self, paces: dict, config: str | None, epochs_left: list[int]) -> tuple[float, float]:
        """(seconds a trial of `config` needs here, its seconds per epoch) for runs with these epochs left."""
        per_epoch, outside = paces.get(config, paces[None])
        return sum(e * per_epoch + outside for e in epochs_left), per_epoch

    def _left(self) -> float:
        return self.deadline - time.monotonic()

    def fitting(self, study, points: Iterable, want: int | None = None) -> list:
        """The first `want` (None: all) grid points (sweep.Point) this worker can finish before its deadline, in
        order; without --hours, simply the first `want`. `points` is read lazily, and only as far as needed: a
        grid of millions is never held (when nothing fits, the rest is counted to say what was left)."""
        points = iter(points)
        if self.deadline is None:
            return list(itertools.islice(points, want))
        paces = self._paces(study)
        if not paces:
            return self._unmeasured(list(itertools.islice(points, 1)))
        fits, left, names, cheapest = [], 0, [], None
        for p in points:
            cost = self._cost(paces, p.config_key, [self._epochs(p.params) - epochs_done(self._run(p.key))])
            if cost[0] <= self._left():
                fits.append(p)
                if len(fits) == want:
                    break
            elif not fits:  # only needed to say why nothing fits
                left += 1
                names += [p.key][:6 - len(names)]
                if cheapest is None or cost[0] < cheapest[1]:
                    cheapest = (p.key, *cost)
        if not fits and cheapest is not None:
            key, seconds, per_epoch = cheapest
            self._stop(f"{key} needs about {_hours(seconds)} at {per_epoch:.1f} s per epoch", names, left)
        return fits

    def allows(self, study, point) -> bool:
        """Whether this worker may start `point` (a queued trial it took may be another than the one it chose)."""
        return bool(self.fitting(study, [point]))

    def allows_tpe(self, study, seeds: int) -> bool:
        """Whether a TPE trial (a config not drawn yet, every seed) fits: judged by the slowest config measured."""
        if self.deadline is None:
            return True
        paces = self._paces(study)
        if not paces:
            return bool(self._unmeasured(["a TPE trial"]))
        d = self.cfg.dims.get("epochs")
        epochs = self.cfg.train.epochs if d is None else d.high if d.is_range else max(d.choices)  # the longest
        cost, per_epoch = self._cost(paces, None, [epochs] * seeds)
        if cost <= self._left():
            return True
        self._stop(f"a trial ({seeds} seeds) needs about {_hours(cost)} at {per_epoch:.1f} s per epoch", [], 0)
        return False

    def _unmeasured(self, points: list) -> list:
        """Nothing measured on this kind of machine: one trial (and say so), then nothing."""
        if self.started:
            return []
        self._say("blind", f"--hours {self.cfg.hours:g}: no pace measured yet on this kind of machine "
                           f"({describe(self.machine())}): running one trial to measure it")
        return points[:1]

    def _stop(self, why: str, names: list[str], left: int) -> None:
        """Say why this worker stops: `left` trials, the first of them named."""
        shown = ", ".join(names[:6]) + (f" and {left - len(names[:6])} more" if left > len(names[:6]) else "")
        self._say("stop", f"--hours {self.cfg.hours:g}: {_hours(max(0.0, self._left()))} left and nothing to start fits "
                          f"({why} on {describe(self.machine())}); left for later"
                          + (f": {left} trial{'s' if left != 1 else ''} ({shown})" if left else "")
                          + "; rerun the same command, here or on another machine, to run them")

    def _say(self, what: str, line: str) -> None:
        if what not in self._said:
            self._said.add(what)
            self.note(line)

    def _epochs(self, params: dict) -> int:
        return params.get("epochs", self.cfg.train.epochs)

    def _run(self, name: str) -> Path:
        return self.cfg.out_dir() / "runs" / name


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 360 else f"{seconds / 60:.1f} min"
