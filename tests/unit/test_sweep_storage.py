"""A sweep's storage: a real PostgreSQL server shared by worker processes (started by scripts/postgres-server.sh;
marked slow), and the one-line errors and bounded waits of sweep_storage (no server needed)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.helpers import REPO, TINY_STUDENT, spawn_kdpipe
from kdpipe import sweep, sweep_storage

TINY = ["--student-config", TINY_STUDENT, "--lr", "3e-3", "--precision", "fp32", "--device", "cpu"]
SCRIPT = REPO / "scripts" / "postgres-server.sh"
PASSWORD = "s3cret-pw"


# ------------------------------------------------------------------------------- a real PostgreSQL server


class Server:
    """A throwaway server (scripts/postgres-server.sh) in a folder of its own under /tmp (pytest's own temp
    folders are closed to the unprivileged user the server runs as, when the tests run as root)."""

    def __init__(self):
        self.folder = Path(tempfile.mkdtemp(prefix="kdpipe-pg-", dir="/tmp"))
        self.url = self._script("start")

    def _script(self, command: str) -> str:
        r = subprocess.run(["bash", str(SCRIPT), command, str(self.folder)], capture_output=True, text=True, timeout=180)
        if r.returncode:
            raise RuntimeError((r.stderr.strip().splitlines() or [f"{SCRIPT.name} {command} failed"])[-1])
        return r.stdout.strip()

    def start(self) -> None:
        self._script("start")

    def stop(self) -> None:
        self._script("stop")

    def database(self) -> str:
        """A new empty database on the server: its URL (each test its own, so study names never meet)."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url.rsplit("/", 1)[0] + "/" + name

    def close(self) -> None:
        subprocess.run(["bash", str(SCRIPT), "stop", str(self.folder)], capture_output=True, timeout=120)
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="module")
def server():
    """A PostgreSQL server for this module's tests; skipped with one line where none can start (CI sets
    KDPIPE_REQUIRE_POSTGRES=1, which makes that a failure instead)."""
    def unavailable(reason: str):
        if os.environ.get("KDPIPE_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"no PostgreSQL server for the storage tests: {reason}")
        pytest.skip(f"no PostgreSQL server can start here: {reason}")

    try:
        import psycopg  # noqa: F401
    except ImportError:
        unavailable("the driver is not installed (pip install -e '.[postgres]')")
    try:
        s = Server()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        unavailable(str(e))
    yield s
    s.close()


def _study(url: str, out: Path):
    import optuna

    return optuna.load_study(study_name=sweep.load_spec(out)["study_name"], storage=sweep.open_storage(url, out))


def _study_if_started(url: str, out: Path):
    try:
        return _study(url, out)
    except (KeyError, sweep.KdpipeError):  # no sweep.json yet, or the study not created yet
        return None


def _done(study) -> list:
    return [t for t in study.get_trials() if t.state.name == "COMPLETE"]


def _epochs(run: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _wait_for(condition, what: str, limit_s: float = 300):
    """Poll until `condition()` is true (a bound against hanging, not a timed assertion)."""
    deadline = time.time() + limit_s
    while time.time() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what}")


def _midway(out: Path) -> list[Path]:
    """Run folders with a checkpoint and no run.json: a trial in the middle of its epochs."""
    return [p.parent for p in out.glob("runs/*/checkpoint.pt") if not (p.parent / "run.json").exists()]


@pytest.mark.slow
def test_two_worker_processes_share_one_postgresql_grid_exactly_once(server, cache_dir, tmp_path, run_cli):
    url, sw = server.database(), tmp_path / "sw"
    args = ["sweep", "--cache", cache_dir, "--temperature", "2,5", "--alpha", "0.25,0.75", "--epochs", "1",
            "--seeds", "0,1", "--storage", url, "--out", sw, *TINY]
    workers = [spawn_kdpipe(*args, cwd=tmp_path) for _ in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n---\n".join(outputs)
    done = _done(_study(url, sw))
    points = sorted(t.user_attrs["point"] for t in done)
    assert points == sorted(f"T{t}-a{a}-seed{s}" for t in (2, 5) for a in (0.25, 0.75) for s in (0, 1))
    assert {t.user_attrs["owner"]["pid"] for t in done} == {w.pid for w in workers}  # both worked on it
    assert all(_epochs(run) == [1] for run in (sw / "runs").iterdir())  # no run folder trained twice
    code, out = run_cli("sweep-report", sw)  # the report reads the same database
    assert code == 0 and "trials: 8 complete" in out, out


@pytest.mark.slow
def test_a_worker_killed_mid_trial_is_continued_with_the_uninterrupted_result(server, cache_dir, tmp_path, run_cli):
    from optuna.trial import TrialState

    url, sw = server.database(), tmp_path / "sw"
    flags = ["--cache", cache_dir, "--epochs", "3", *TINY]
    args = ["sweep", *flags, "--storage", url, "--alpha", "0.25,0.75", "--seeds", "0,1", "--out", sw]
    workers = {w.pid: w for w in (spawn_kdpipe(*args, cwd=tmp_path) for _ in range(2))}
    study = _wait_for(lambda: _study_if_started(url, sw), "the sweep to start")

    def victim():  # a trial in the middle of its epochs, and the worker process that runs it
        midway = {p.name for p in _midway(sw)}
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.user_attrs.get("point") in midway and t.user_attrs.get("owner", {}).get("pid") in workers:
                return t.user_attrs["point"], t.user_attrs["owner"]["pid"]
        return None

    point, pid = _wait_for(victim, "a trial in the middle of its epochs")
    workers[pid].send_signal(signal.SIGKILL)
    workers[pid].wait()
    survivor = next(w for p, w in workers.items() if p != pid)
    output = survivor.communicate(timeout=600)[0]
    assert survivor.returncode == 0, output
    code, out = run_cli(*args)  # the survivor picked it up, or this rerun does
    assert code == 0, out
    trials = _study(url, sw).get_trials()
    done = sorted(t.user_attrs["point"] for t in trials if t.state == TrialState.COMPLETE)
    assert done == sorted(f"a{a}-seed{s}" for a in (0.25, 0.75) for s in (0, 1))
    assert [(t.user_attrs["point"], t.user_attrs.get("failed")) for t in trials if t.state == TrialState.FAIL
            and "duplicate" not in t.user_attrs] == [(point, "worker died")]
    assert _epochs(sw / "runs" / point) == [1, 2, 3]  # continued from its checkpoint: every epoch once
    # the uninterrupted result: the same run, alone and never killed (a journal sweep of that one point)
    alpha, seed = point[1:].split("-seed")
    assert run_cli("sweep", *flags, "--alpha", alpha, "--seeds", seed, "--out", tmp_path / "ref")[0] == 0
    cut, whole = ([json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
                  for folder in (sw / "runs" / point, next((tmp_path / "ref" / "runs").iterdir())))
    for a, b in zip(cut, whole, strict=True):
        assert a["train"]["loss"] == pytest.approx(b["train"]["loss"], rel=1e-5)
        assert a["validation"]["accuracy"] == b["validation"]["accuracy"]
        assert a["validation"]["nll"] == pytest.approx(b["validation"]["nll"], rel=1e-5)


@pytest.mark.slow
def test_the_server_restarted_mid_sweep_loses_no_trial_and_the_workers_wait_for_it(server, cache_dir, tmp_path):
    url, sw = server.database(), tmp_path / "sw"
    args = ["sweep", "--cache", cache_dir, "--alpha", "0.25,0.75", "--epochs", "2", "--seeds", "0,1,2",
            "--storage", url, "--storage-wait", "120", "--out", sw, *TINY]
    workers = [spawn_kdpipe(*args, cwd=tmp_path) for _ in range(2)]
    _wait_for(lambda: list(sw.glob("runs/*/run.json")) and _midway(sw), "a finished trial and one under way")
    before = {t.number: (t.user_attrs["point"], t.value) for t in _done(_study(url, sw))}
    server.stop()
    time.sleep(6)  # a few epochs' heartbeats and claims meet a closed port
    server.start()
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n---\n".join(outputs)
    text = "".join(outputs)
    assert "Traceback" not in text and PASSWORD not in text
    assert "does not answer" in text and "waits and retries" in text and "answers again after" in text, text
    done = _done(_study(url, sw))
    assert sorted(t.user_attrs["point"] for t in done) == sorted(f"a{a}-seed{s}" for a in (0.25, 0.75) for s in (0, 1, 2))
    assert before and all({t.number: (t.user_attrs["point"], t.value) for t in done}[n] == v for n, v in before.items())
    assert all(_epochs(run) == [1, 2] for run in (sw / "runs").iterdir())  # nothing rerun, nothing lost


@pytest.mark.slow
def test_a_worker_stops_with_one_line_after_storage_wait_and_a_rerun_continues(server, cache_dir, tmp_path, run_cli):
    url, sw = server.database(), tmp_path / "sw"
    args = ["sweep", "--cache", cache_dir, "--epochs", "3", "--seeds", "0,1", "--storage", url, "--storage-wait", "3",
            "--out", sw, *TINY]
    worker = spawn_kdpipe(*args, cwd=tmp_path)
    _wait_for(lambda: _midway(sw), "a trial under way")
    server.stop()
    try:
        output = worker.communicate(timeout=300)[0]
    finally:
        server.start()
    lines = output.strip().splitlines()
    password = url.split(":")[2].split("@")[0]
    assert worker.returncode == 1 and "Traceback" not in output and password not in output, output
    assert lines[-1].startswith(f"error: --storage {url.replace(password, '***')}: no answer for 3 s "
                                "(--storage-wait; connection"), output
    assert "pg_isready -h 127.0.0.1" in lines[-1] and "rerun the same command" in lines[-1]
    cut = _midway(sw)[0]
    code, out = run_cli(*args)
    assert code == 0, out
    trials = _study(url, sw).get_trials()
    assert sorted(t.state.name for t in trials) == ["COMPLETE", "COMPLETE", "FAIL"]
    assert _epochs(cut) == [1, 2, 3]


# ------------------------------------------------------------------------------- URLs, drivers (no server)


@pytest.mark.parametrize("url, message", [
    (f"postgresql://kd:{PASSWORD}@127.0.0.1:1/none", "--storage postgresql://kd:***@127.0.0.1:1/none: cannot connect "),
    (f"postgres//kd:{PASSWORD}@dbhost/x", "--storage postgres//kd:***@dbhost/x: not a database URL; write it as"),
    (f"nosuchdb://kd:{PASSWORD}@dbhost/x", "--storage nosuchdb://kd:***@dbhost/x: SQLAlchemy knows no database"),
    (f"postgresql+pg8000://kd:{PASSWORD}@dbhost/x", "its database driver (pg8000) is not installed; pip install pg8000"),
])
def test_a_storage_that_cannot_be_opened_is_one_line_with_the_password_masked(run_cli, cache_dir, tmp_path, url,
                                                                              message):
    if "cannot connect" in message:  # without the driver this is the missing driver's line (the next test)
        pytest.importorskip("psycopg")
    code, out = run_cli("sweep", "--cache", cache_dir, "--epochs", "1", "--storage", url, "--out", tmp_path / "sw")
    assert code == 1 and message in out and PASSWORD not in out and "Traceback" not in out, out
    assert len(out.strip().splitlines()) == 2  # the sweep's first line, then the error
    if "cannot connect" in message:
        assert "pg_isready -h 127.0.0.1 -p 1" in out


def test_postgresql_without_its_driver_names_the_extra_to_install(run_cli, cache_dir, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "psycopg", None)  # as where kdpipe[postgres] was not installed
    code, out = run_cli("sweep", "--cache", cache_dir, "--epochs", "1", "--storage",
                        f"postgresql://kd:{PASSWORD}@127.0.0.1:1/none", "--out", tmp_path / "sw")
    assert code == 1 and "pip install 'kdpipe[postgres]'" in out and PASSWORD not in out, out


def test_the_report_of_a_sweep_whose_database_is_away_is_one_line(run_cli, tmp_path):
    pytest.importorskip("psycopg")
    sw = tmp_path / "sw"
    sw.mkdir()
    (sw / "sweep.json").write_text(json.dumps({"study_name": "sw", "spec": {"plan": "sw"},  # a plan study's record
                                               "storage": f"postgresql://kd:{PASSWORD}@127.0.0.1:1/kdpipe"}))
    code, out = run_cli("sweep-report", sw)
    assert code == 1 and "postgresql://kd:***@127.0.0.1:1/kdpipe: cannot connect" in out and PASSWORD not in out, out


# ------------------------------------------------------------------------------- waiting (a stand-in database)


def _cut(message: str = "server closed the connection unexpectedly", pending: bool = False):
    """What SQLAlchemy raises when the server is gone, as Optuna re-raises it; `pending`: as it comes out of a query
    cut mid-way that Optuna retried on the same session (seen with a real server restarted)."""
    from optuna.exceptions import StorageInternalError
    from sqlalchemy.exc import OperationalError, PendingRollbackError

    cause = PendingRollbackError("Can't reconnect until invalid transaction is rolled back.") if pending else \
        OperationalError("SELECT 1", {}, Exception(message))
    wrapped = StorageInternalError("An exception is raised during the commit.")
    wrapped.__cause__ = cause
    return wrapped


class Flaky:
    """A storage that fails `failures` calls as an absent server does, then answers."""

    def __init__(self, failures: int, then=None, pending: bool = False):
        self.failures, self.then, self.pending, self.calls = failures, then, pending, 0

    def get_all_trials(self, study_id):
        self.calls += 1
        if self.calls <= self.failures:
            raise _cut(pending=self.pending and self.calls > 1)
        return ["trial"]

    def set_trial_state_values(self, trial_id, state, values=None):
        self.calls += 1
        if self.calls <= self.failures:
            raise _cut()
        raise self.then

    def get_trial(self, trial_id):
        return SimpleNamespace(state="COMPLETE")


URL = f"postgresql://kd:{PASSWORD}@dbhost:5432/kdpipe"


@pytest.mark.parametrize("pending", [False, True], ids=["refused", "cut mid-query"])
def test_a_call_waits_for_the_database_and_says_so(monkeypatch, pending):
    monkeypatch.setattr(sweep_storage, "RETRY_S", 0.01)
    notes = []
    storage = sweep_storage.Storage(Flaky(3, pending=pending), URL, 60, notes.append)
    assert storage.get_all_trials(1) == ["trial"] and storage.backend.calls == 4
    assert len(notes) == 2 and all(PASSWORD not in n for n in notes)
    assert notes[0].startswith("--storage postgresql://kd:***@dbhost:5432/kdpipe does not answer (server closed")
    assert "waits and retries every 0.01 s for up to 60 s (--storage-wait)" in notes[0]
    assert notes[1].startswith("--storage postgresql://kd:***@dbhost:5432/kdpipe answers again after")
    assert storage.calls == 1 and storage.seconds > 0  # one call, however many tries


def test_a_database_away_longer_than_the_wait_is_one_line(monkeypatch):
    monkeypatch.setattr(sweep_storage, "RETRY_S", 0.01)
    storage = sweep_storage.Storage(Flaky(10**6), URL, 0.05, None)
    with pytest.raises(sweep_storage.StorageUnreachable) as e:
        storage.get_all_trials(1)
    assert str(e.value).startswith("--storage postgresql://kd:***@dbhost:5432/kdpipe: no answer for 0.05 s "
                                   "(--storage-wait; server closed")
    assert "pg_isready -h dbhost -p 5432" in str(e.value) and PASSWORD not in str(e.value)
    calls = storage.backend.calls
    with pytest.raises(sweep_storage.StorageUnreachable):  # still away: the next call does not wait again
        storage.get_all_trials(1)
    assert storage.backend.calls == calls + 1


def test_other_errors_are_not_retried():
    from optuna.exceptions import StorageInternalError

    class Broken:
        calls = 0

        def get_all_trials(self, study_id):
            Broken.calls += 1
            raise StorageInternalError("exceeding max length")  # a refusal, not an absent server

    notes = []
    with pytest.raises(StorageInternalError):
        sweep_storage.Storage(Broken(), URL, 60, notes.append).get_all_trials(1)
    assert Broken.calls == 1 and notes == []


def test_a_final_state_that_landed_before_the_connection_was_cut_is_not_an_error(monkeypatch):
    from optuna.exceptions import UpdateFinishedTrialError

    monkeypatch.setattr(sweep_storage, "RETRY_S", 0.01)
    storage = sweep_storage.Storage(Flaky(1, then=UpdateFinishedTrialError("finished")), URL, 60, None)
    assert storage.set_trial_state_values(7, "COMPLETE") is True  # the retry found the trial already COMPLETE
    with pytest.raises(UpdateFinishedTrialError):  # not after a cut: a real error
        sweep_storage.Storage(Flaky(0, then=UpdateFinishedTrialError("finished")), URL, 60, None) \
            .set_trial_state_values(7, "COMPLETE")
