"""A sweep's storage under load: several workers on tiny trials, PostgreSQL against the default journal file.

Tiny generated images and a tiny student (the tests' own, tests/helpers.py), so that a trial takes a second or
two and the storage's share shows. For each storage, --workers worker processes start at once on one grid of
--points trials (1 epoch each) and work until it is done; a throwaway PostgreSQL server on the loopback is started
with scripts/postgres-server.sh. Measured per storage:

  trials per minute   finished trials / the time from the first trial's start to the last one's end (the
                      storage's own time stamps: the workers' start-up, imports and data loading, is left out)
  duplicates, lost    grid points finished more than once or not at all, and run folders trained twice: must be 0
  storage per trial   the time the workers spent inside storage calls (sweep_storage.Storage counts every call
                      with its retries), summed over workers, per finished trial; and the calls per trial
  step-backs          claims that found another worker on the same point and stepped back (sweep.py)

    python benchmarks/bench_sweep_storage.py                   # 4 workers, 24 trials per storage (~10 min here)
    python benchmarks/bench_sweep_storage.py --quick           # 2 workers, 6 trials: a smoke check
    python benchmarks/bench_sweep_storage.py --docs            # also write the table into docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _common import print_table  # noqa: E402
import tests.conftest  # noqa: E402,F401  (sets OMP_NUM_THREADS=1 before torch is imported)
from tests.helpers import SIZE, make_image_folder, make_teacher  # noqa: E402

DOCS = REPO / "docs" / "benchmarks.md"
SCRIPT = REPO / "scripts" / "postgres-server.sh"
BEGIN, END = "<!-- bench_sweep_storage: begin -->", "<!-- bench_sweep_storage: end -->"


def worker(spec: dict) -> None:
    """One worker process: sweep.run on the grid, then its storage counters as one JSON line on stdout."""
    from kdpipe import sweep
    from kdpipe.config import SweepConfig

    opened, open_storage = [], sweep.open_storage

    def counting(*args, **kwargs):  # the sweep's storage, kept to read its counters
        opened.append(open_storage(*args, **kwargs))
        return opened[-1]

    sweep.open_storage = counting
    finished = []
    cfg = SweepConfig.from_flags(dict(spec["train"]), seeds=spec["seeds"], out=Path(spec["out"]), storage=spec["storage"])
    sweep.run(cfg, on_trial=lambda result, total: finished.append(result.number))
    print(json.dumps({"pid": os.getpid(), "trials": len(finished), "calls": sum(s.calls for s in opened),
                      "seconds": sum(s.seconds for s in opened)}))


def run_workers(spec: dict, workers: int) -> tuple[list[dict], float]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(workers)]
    outs = [p.communicate() for p in procs]
    wall = time.perf_counter() - start
    for p, (out, err) in zip(procs, outs):
        if p.returncode:
            raise SystemExit(f"a worker failed ({p.returncode}): {err.strip().splitlines()[-1] if err.strip() else out}")
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs], wall


def tally(spec: dict, counters: list[dict], wall: float, points: int) -> dict:
    import optuna

    from kdpipe import sweep

    out = Path(spec["out"])
    study = optuna.load_study(study_name=sweep.load_spec(out)["study_name"], storage=sweep.open_storage(spec["storage"], out))
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state.name == "COMPLETE"]
    per_point = {}
    for t in done:
        per_point[t.user_attrs["point"]] = per_point.get(t.user_attrs["point"], 0) + 1
    retrained = sum(len((run / "metrics.jsonl").read_text().splitlines()) > int(spec["train"]["epochs"])
                    for run in (out / "runs").iterdir())
    span = max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)
    calls, seconds = sum(c["calls"] for c in counters), sum(c["seconds"] for c in counters)
    return {"trials": len(done), "points": points, "wall_s": round(wall, 1), "span_s": round(span.total_seconds(), 1),
            "trials_per_min": round(len(done) / span.total_seconds() * 60, 2),
            "duplicates": sum(n - 1 for n in per_point.values()) + retrained, "lost": points - len(per_point),
            "storage_s_per_trial": round(seconds / len(done), 4), "storage_calls_per_trial": round(calls / len(done), 1),
            "step_backs": sum(1 for t in trials if t.state.name == "FAIL" and "duplicate" in t.user_attrs),
            "trials_per_worker": sorted(c["trials"] for c in counters)}


def markdown(results: dict, settings: dict, machine: str) -> str:
    rows = [f"| {name} | {r['trials']} of {r['points']} | {r['trials_per_min']:.1f} | {r['duplicates']} / {r['lost']} | "
            f"{1000 * r['storage_s_per_trial']:.0f} ms ({r['storage_calls_per_trial']:.0f} calls) | {r['step_backs']} | "
            f"{', '.join(map(str, r['trials_per_worker']))} |" for name, r in results.items()]
    return "\n".join([
        BEGIN,
        f"## Sweep storage under load (`bench_sweep_storage.py`, {settings['date']})",
        "",
        f"{settings['workers']} worker processes started at once on one grid of {settings['points']} tiny trials "
        f"(1 epoch of the tests' 36-image set and tiny student, about a second each), on each storage in turn; "
        f"{machine}. PostgreSQL {settings['postgres']} on the loopback (`scripts/postgres-server.sh`), "
        "the journal file on local disk. Trials per minute from the first trial's start to the last one's end "
        "(the storage's time stamps: start-up left out); storage time is the time spent inside storage calls, "
        "summed over the workers, per finished trial.",
        "",
        "| storage | trials finished | trials / min | duplicates / lost | storage time per trial | step-backs | "
        "trials per worker |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Duplicates and lost trials must be 0 (every grid point exactly once); a step-back is a claim that met "
        "another worker's claim of the same point and let it go (docs/sweep.md), not a duplicate. Raw figures: "
        f"`{settings['json']}`.",
        END,
    ])


def write_docs(text: str) -> None:
    """Replace the section between the markers in docs/benchmarks.md, or add it at the end."""
    doc = DOCS.read_text()
    if BEGIN in doc:
        doc = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda m: text, doc, flags=re.S)
    else:
        doc = doc.rstrip("\n") + "\n\n" + text + "\n"
    DOCS.write_text(doc)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=None, help="worker processes per storage (default 4; quick 2)")
    p.add_argument("--points", type=int, default=None, help="grid points, i.e. trials (default 24; quick 6)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "benchmarks" / "sweep_storage.json")
    p.add_argument("--docs", action="store_true", help="write the table into docs/benchmarks.md")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    workers, points = args.workers or (2 if args.quick else 4), args.points or (6 if args.quick else 24)
    from kdpipe import cache_teacher, runtime
    from kdpipe.config import CacheConfig

    with tempfile.TemporaryDirectory(prefix="kdpipe-bench-storage-") as tmp:
        tmp = Path(tmp)
        data = make_image_folder(tmp / "images")
        cache_teacher.run(CacheConfig(teacher=str(make_teacher(tmp / "teacher")), dataset=str(data), out=tmp / "cache",
                                      precision="fp32", workers=0))
        server = Path(tempfile.mkdtemp(prefix="kdpipe-pg-", dir="/tmp"))  # open to the server's own user
        started = subprocess.run(["bash", str(SCRIPT), "start", str(server)], capture_output=True, text=True)
        if started.returncode:
            raise SystemExit(f"no PostgreSQL server: {started.stderr.strip()}")
        try:
            import psycopg

            url = started.stdout.strip()
            with psycopg.connect(url) as conn:
                version = conn.execute("show server_version").fetchone()[0].split()[0]
            seeds = list(range(points // 2))  # two configs x points/2 seeds
            train = {"cache": str(tmp / "cache"), "alpha": "0.25,0.75", "epochs": "1", "lr": "3e-3", "precision": "fp32",
                     "device": "cpu", "student_config": {"image_size": SIZE, "depth_multiplier": 0.35,
                                                         "classifier_dropout_prob": 0.0}}  # the tests' tiny student
            results = {}
            for name, storage in (("PostgreSQL", url), ("journal file (default)", None)):
                spec = {"train": train, "seeds": seeds, "out": str(tmp / f"sweep-{len(results)}"), "storage": storage}
                counters, wall = run_workers(spec, workers)
                results[name] = tally(spec, counters, wall, 2 * len(seeds))
                print(f"{name}: {results[name]}", flush=True)
        finally:
            subprocess.run(["bash", str(SCRIPT), "stop", str(server)], capture_output=True)
            subprocess.run(["rm", "-rf", str(server)])
    machine = f"{runtime.cpu_model()}, {os.cpu_count()} cores shared with other work"
    print_table(f"{workers} workers, {2 * len(seeds)} tiny trials per storage ({machine})",
                ["storage", "trials/min", "duplicates", "lost", "storage s/trial", "calls/trial", "step-backs"],
                [[n, r["trials_per_min"], r["duplicates"], r["lost"], r["storage_s_per_trial"],
                  r["storage_calls_per_trial"], r["step_backs"]] for n, r in results.items()])
    settings = {"workers": workers, "points": 2 * len(seeds), "epochs": 1, "postgres": version,
                "date": datetime.date.today().isoformat(), "json": str(args.json.relative_to(REPO))
                if args.json.is_relative_to(REPO) else str(args.json)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"benchmark": "sweep_storage", "settings": settings, "machine": machine,
                                     "results": results}, indent=2) + "\n")
    print(f"wrote {args.json}")
    if args.docs:
        write_docs(markdown(results, settings, machine))
        print(f"wrote {DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
