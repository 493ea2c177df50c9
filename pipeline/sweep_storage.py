"""A sweep's Optuna storage: opened with one line per way it can fail, and kept through a database that goes
away for a while (a restart, a failover) without losing a finished trial.

open_storage(None, out)   Optuna's journal file `<out>/study.journal` (several processes of one machine)
open_storage(url, out)    an RDB through SQLAlchemy: postgresql://user:password@host:port/db (the `postgres`
                          extra installs the driver SQLAlchemy picks for it, psycopg 3), mysql://, sqlite:///file

Either comes back wrapped in `Storage`, which forwards every call to Optuna's storage and times it (the load
benchmark reads `calls` and `seconds`). When the database cannot be reached (refused, cut, shut down: SQLAlchemy's
OperationalError or InterfaceError, which Optuna re-raises as StorageInternalError), `Storage` says so once
(`note`), retries the call every RETRY_S seconds for up to `wait_s` (--storage-wait), says when the database is
back, and after `wait_s` raises StorageUnreachable: one line with the URL, its password masked, and how to
check it. Retrying is safe because each Optuna call is one transaction and a transaction whose session was cut
is rolled back by the server. The one case where it did commit (the acknowledgment lost on the way back) is
harmless for every call the sweep makes but one, a trial's final state, which `set_trial_state_values` checks.

The RDB is used bare, not through Optuna's _CachedStorage (what `optuna.create_study(storage=url)` would wrap
it in): that cache stops re-reading trials numbered below the newest finished one, so a trial another worker
created earlier but committed later can stay invisible to it, and the grid's exactly-once claim
(sweep.grid_worker) needs every committed trial in each check.

Who holds a trial stays the sweep's own `owner` attribute (host, pid, last epoch's time: sweep.fail_stale_trials),
not Optuna's heartbeat and its stale-trial callback: those run inside `study.optimize` only (Optuna documents
that they do nothing with ask/tell, which the grid's claims need), exist for RDB storages only (not the journal
file of one machine), and judge a worker dead only after a grace period, where the owner's pid tells a dead worker
on the same machine at once. Both record the same thing, a time stamp per trial that a live worker renews.
"""

from __future__ import annotations

import contextlib
import functools
import re
import time
from pathlib import Path
from typing import Callable

from .errors import KdpipeError

RETRY_S = 2.0  # between two tries of a call while the database is away: a restart takes a few seconds
CONNECT_TIMEOUT_S = 10  # a host that drops packets is an error after this, not after the OS's minutes of retries
DRIVERS = {  # SQLAlchemy's driver name -> what to pip install
    "psycopg": "'kdpipe[postgres]' (psycopg 3, the driver SQLAlchemy picks for postgresql://)",
    "psycopg2": "psycopg2-binary", "pg8000": "pg8000", "asyncpg": "asyncpg", "pymysql": "PyMySQL",
    "mysqldb": "mysqlclient", "mysqlconnector": "mysql-connector-python",
}


class StorageUnreachable(KdpipeError):
    """The sweep's database did not answer for --storage-wait seconds (or at all, when opened)."""


def masked(url: str) -> str:
    """`url` with its password replaced by ***, also where SQLAlchemy cannot parse it."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # unparsable: mask whatever stands between user: and @
        return re.sub(r"(?<=:)[^:@/]*(?=@)", "***", url)


def check_hint(url: str) -> str:
    """How to check that a database answers, for the error lines."""
    from sqlalchemy.engine import make_url

    try:
        u = make_url(url)
    except Exception:
        return "check the URL"
    if u.get_backend_name() == "postgresql":
        return (f"check that the server is up and reachable from here (pg_isready -h {u.host or 'localhost'} -p "
                f"{u.port or 5432}) and the user, password and database in the URL")
    return "check that the database server is up and reachable from here, and the user, password and database in the URL"


def open_storage(url: str | None, out: Path, wait_s: float = 0.0, note: Callable[[str], None] | None = None):
    """The sweep's storage (see the module's docstring), wrapped in `Storage`; an RDB that cannot be opened is
    a one-line KdpipeError naming --storage with the password masked. No wait here: a URL that never worked
    (a typo, a missing driver) should be said at once, not after --storage-wait."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if url is None:
        return Storage(JournalStorage(JournalFileBackend(str(out / "study.journal"))), None, wait_s, note)
    return Storage(_open_rdb(url), url, wait_s, note)


def _open_rdb(url: str):
    from optuna.storages import RDBStorage
    from sqlalchemy import exc
    from sqlalchemy.engine import make_url

    shown = f"--storage {masked(url)}"
    try:
        parsed = make_url(url)
        dialect = parsed.get_dialect()
    except exc.NoSuchModuleError:  # (an ArgumentError too)
        raise KdpipeError(f"{shown}: SQLAlchemy knows no database {url.split(':', 1)[0]!r}; check the URL's scheme "
                          "(postgresql://, mysql://, sqlite:///...)") from None
    except exc.ArgumentError:
        raise KdpipeError(f"{shown}: not a database URL; write it as dialect://user:password@host:port/database (e.g. "
                          "postgresql://kdpipe:***@dbhost:5432/kdpipe), or leave --storage out for a journal file in "
                          "--out") from None
    engine = {"pool_pre_ping": True}  # a connection the server dropped (a restart) is replaced, not used and failed
    if parsed.get_backend_name() == "postgresql" and dialect.driver in ("psycopg", "psycopg2"):
        engine["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    try:
        return _created(lambda: RDBStorage(url, engine_kwargs=engine))
    except ImportError:
        package = DRIVERS.get(dialect.driver, dialect.driver)
        raise KdpipeError(f"{shown}: its database driver ({dialect.driver}) is not installed; pip install {package} "
                          "on every worker") from None
    except Exception as e:
        cause = connection_error(e)
        if cause is None:  # e.g. a schema of another Optuna version
            raise KdpipeError(f"{shown}: cannot open it ({reason(e, url)}); {check_hint(url)}") from None
        raise StorageUnreachable(f"{shown}: cannot connect ({reason(cause, url)}); {check_hint(url)}") from None


def _created(make, tries: int = 5):
    """`make()` again after a clash of two workers creating Optuna's tables at once in a new database (PostgreSQL
    refuses the second CREATE TABLE: IntegrityError or ProgrammingError); on the next try the tables exist."""
    import random

    from sqlalchemy import exc

    for attempt in range(tries):
        try:
            return make()
        except (exc.IntegrityError, exc.ProgrammingError):
            if attempt == tries - 1:
                raise
            time.sleep(random.uniform(0.1, 0.5))


def connection_error(e: BaseException):
    """The database-connection error behind `e` (SQLAlchemy's OperationalError or InterfaceError, as raised or as
    the cause of Optuna's StorageInternalError; or PendingRollbackError: a query cut mid-way, which Optuna caught
    and retried on the same session), or None when `e` is something else."""
    from sqlalchemy import exc

    for _ in range(8):  # along the `raise ... from` chain
        if e is None:
            return None
        if isinstance(e, (exc.OperationalError, exc.InterfaceError, exc.PendingRollbackError)) or \
                (isinstance(e, exc.DBAPIError) and e.connection_invalidated):
            return e
        e = e.__cause__
    return None


def reason(e: BaseException, url: str | None = None) -> str:
    """The first line of the driver's own message (never the password)."""
    text = str(getattr(e, "orig", None) or e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    if url:
        from sqlalchemy.engine import make_url

        with contextlib.suppress(Exception):
            password = make_url(url).password
            if password:
                line = line.replace(str(password), "***")
    return line[:300]


class Storage:
    """An Optuna storage whose calls wait out an unreachable database (module docstring). Any attribute of the
    wrapped storage is available; its methods go through `_call`."""

    def __init__(self, backend, url: str | None, wait_s: float, note: Callable[[str], None] | None):
        self.backend, self.url, self.wait_s = backend, url, wait_s
        self.note = note or (lambda line: None)
        self.calls, self.seconds = 0, 0.0  # every storage call of this process, and the time spent in them
        self._down_since: float | None = None  # when the current outage was first seen
        self._patient = True

    def __getattr__(self, name: str):
        if name == "backend":  # not set yet (copy, unpickling): not the wrapped storage's to answer
            raise AttributeError(name)
        attr = getattr(self.backend, name)
        if name.startswith("_") or not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args, **kwargs):
            return self._call(name, attr, args, kwargs)

        return call

    @property
    def label(self) -> str:
        return f"--storage {masked(self.url)}" if self.url else "the sweep's journal file"

    @contextlib.contextmanager
    def impatient(self):
        """One try per call, no waiting: for recording a failure, where the database may be what failed."""
        self._patient = False
        try:
            yield
        finally:
            self._patient = True

    def _call(self, name: str, fn, args, kwargs):
        start, retried = time.perf_counter(), False
        try:
            while True:
                try:
                    result = fn(*args, **kwargs)
                    break
                except Exception as e:
                    if retried and name == "set_trial_state_values" and self._landed(e, *args, **kwargs):
                        result = True  # the earlier try committed; its acknowledgment was lost with the connection
                        break
                    cause = connection_error(e)
                    if cause is None or self.url is None:
                        raise
                    self._wait(cause)
                    retried = True
            if self._down_since is not None:
                self.note(f"{self.label} answers again after {time.monotonic() - self._down_since:.0f} s; carrying on")
                self._down_since = None
            return result
        finally:
            self.calls += 1
            self.seconds += time.perf_counter() - start

    def _wait(self, cause: BaseException) -> None:
        """Sleep before the next try, or raise StorageUnreachable once the outage has lasted wait_s."""
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
            if self._patient and self.wait_s > 0:
                self.note(f"{self.label} does not answer ({reason(cause, self.url)}); this worker waits and retries "
                          f"every {RETRY_S:g} s for up to {self.wait_s:g} s (--storage-wait)")
        waited = now - self._down_since
        if not self._patient or self.wait_s == 0:
            raise StorageUnreachable(f"{self.label}: cannot connect ({reason(cause, self.url)}); "
                                     f"{check_hint(self.url)}") from None
        if waited >= self.wait_s:
            raise StorageUnreachable(
                f"{self.label}: no answer for {self.wait_s:g} s (--storage-wait; {reason(cause, self.url)}); "
                f"{check_hint(self.url)}, then rerun the same command: finished trials are kept, and a trial cut short "
                "continues from its last checkpoint") from None
        time.sleep(min(RETRY_S, self.wait_s - waited))

    def _landed(self, e: Exception, trial_id: int, state, values=None) -> bool:
        """Whether a retried set_trial_state_values failed only because its earlier try had committed."""
        from optuna.exceptions import UpdateFinishedTrialError

        if not isinstance(e, UpdateFinishedTrialError):
            return False
        return self.backend.get_trial(trial_id).state == state


@contextlib.contextmanager
def recording_failure(study):
    """Around recording a trial's failure: one try, and a storage that does not answer is not an error of its
    own (the failure being recorded may be that very outage; the trial then stays RUNNING with a dead owner,
    which the next worker fails and reruns)."""
    storage = study._storage
    with (storage.impatient() if isinstance(storage, Storage) else contextlib.nullcontext()):
        try:
            yield
        except StorageUnreachable:
            pass
