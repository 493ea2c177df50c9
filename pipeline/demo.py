"""The embedded demo: a small teacher and dataset that ship in kdpipe's source tree (data/demo/), so that the
whole pipeline runs on any machine, with no network and no files from elsewhere.

`demo` is a short name that `--teacher`, `--dataset` (and everything that reopens a recorded one) accept:
  --dataset demo   data/demo/digits: the UCI handwritten digits bundled with scikit-learn, 32-px grey PNGs in
                   Parquet with a ClassLabel column, fixed splits 1,257 / 270 / 270 (data/demo/make_digits.py)
  --teacher demo   data/demo/digits-vit: a 0.46 M-parameter ViT trained on that train split
                   (data/demo/train_teacher.py); a demo teacher, not a Beans one
A file or folder called `demo` in the working folder wins over the short name, as a local path wins over a Hub id.

`STEPS` are the commands `kdpipe demo` runs, word for word as a user would type them (the README shows the
same lines, and a test holds the two equal): the teacher pass, a distilled student, and its λ = 0 twin (the same
run with the KD term off: same cache, views, seed, schedule and normalisation), each idempotent (a rerun
reuses the cache and returns finished runs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import KdpipeError

NAME = "demo"
ROOT = Path(__file__).resolve().parents[1] / "data" / "demo"
PATHS = {"dataset": ROOT / "digits", "teacher": ROOT / "digits-vit"}

CACHE = "data/cache/digits-vit/digits"  # cache-teacher's default --out for these two (<teacher>/<dataset>)
# the default recipe and a student at the teacher's 32 px (both chosen by train-student itself); 8 epochs keep the
# demo within a few minutes on a 2-core CPU (docs/results.md: what more epochs and seeds give)
EPOCHS = 8
STUDENT = ["--epochs", str(EPOCHS), "--resume"]
RUNS = {"distilled": "data/runs/demo-kd", "twin": "data/runs/demo-twin"}
STEPS = [
    ["cache-teacher", "--teacher", NAME, "--dataset", NAME],
    ["train-student", "--cache", CACHE, "--out", RUNS["distilled"], *STUDENT],
    ["train-student", "--cache", CACHE, "--out", RUNS["twin"], "--alpha", "0", *STUDENT],
]


def resolve(spec: str, what: str) -> str:
    """`spec` itself, or the embedded demo's path for `what` ("dataset" or "teacher") when spec is `demo` and
    no local file of that name exists; relative to the working folder when it lies under it."""
    if spec != NAME or Path(spec).exists():
        return spec
    path = PATHS[what]
    if not path.is_dir():
        raise KdpipeError(f"--{what} demo: the embedded demo {what} is not at {path}; it ships in kdpipe's source "
                          f"tree (data/demo/): install kdpipe from a clone with pip install -e .")
    try:
        return os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return str(path)


@dataclass(frozen=True)
class Row:
    """One line of the demo's table: a model and its accuracy on validation and test."""

    name: str
    what: str
    validation: float
    test: float
    test_agreement: float | None  # with the teacher, on test
    folder: str


def summary(cache: str = CACHE, runs: dict[str, str] = RUNS) -> list[Row]:
    """The teacher (from its cache) and each named run (from its run.json), side by side."""
    from . import logit_store, run_folder

    rows = logit_store.inspect(Path(cache))  # (split, LogitSplit, teacher accuracy, bytes), every file verified
    teacher_acc = {name: acc for name, _, acc, _ in rows}
    spec = rows[0][1].meta["teacher"]["spec"]
    out = [Row("teacher", spec, teacher_acc.get("validation", float("nan")), teacher_acc.get("test", float("nan")),
               None, str(cache))]
    for name, folder in runs.items():
        r = run_folder.load_report(Path(folder))
        alpha = r.run["config"]["alpha"]
        what = f"λ {alpha:g}, T {r.run['config']['temperature']:g}" if alpha else "λ 0"
        out.append(Row(name, what, r.validation["accuracy"], r.test["accuracy"],
                       r.test.get("teacher_agreement"), str(folder)))
    return out
