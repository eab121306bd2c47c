"""SQLite stores (MLflow's tracking store, Optuna's studies) that a kill cannot leave half made.

MLflow creates its SQLite store in many steps (its first tables, then some sixty schema
migrations), and SQLite's Python driver commits each ``CREATE``/``ALTER TABLE`` on its own: a sweep
killed during those seconds left a store that no later run could open ("table ... already
exists"), so the folder was broken for good. Optuna's creation is shorter but has the same shape.

Here a store that does not exist yet is built whole under a temporary name in its own folder and
only then given its real name (a hard link, which never replaces a store another process created
meanwhile). The real name therefore only ever names a complete store; a kill during the build leaves
a temporary file, which the next creation removes. Once a store exists, every write to it is one
SQLite transaction, which SQLite itself rolls back on the next open when a kill cut it short.

A store that an earlier version left unfinished (a leftover ``_alembic_tmp_`` table, no schema
version) is moved aside and built again when it holds no work, and refused with what to do when it
does.
"""

from __future__ import annotations

import contextlib
import glob
import os
import socket
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from trainables.errors import WbsweepError

#: The files SQLite keeps beside a database while it writes to it.
SIDE_FILES = ("-journal", "-wal", "-shm")


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLAlchemy SQLite URL (``sqlite:///path``), or None: another kind
    of store (a tracking server, PostgreSQL) or an in-memory database."""
    if not url.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def with_database(url: str, path: Path) -> str:
    """``url`` with its database file replaced by ``path`` (its query options kept)."""
    from sqlalchemy.engine import make_url

    return make_url(url).set(database=str(path)).render_as_string(hide_password=False)


@dataclass
class StoreState:
    """What an existing SQLite store holds, read without any store library."""

    tables: set[str]
    revision: str | None  # the schema version Alembic recorded (``alembic_version``), None: none yet
    work_rows: int  # rows of the table that holds the work (MLflow's runs, Optuna's trials)

    def leftover_tables(self) -> list[str]:
        """Tables an interrupted Alembic migration leaves behind (its copy of a table being changed)."""
        return sorted(t for t in self.tables if t.startswith("_alembic_tmp_"))


def read_state(path: Path, work_table: str) -> StoreState | None:
    """The state of the store ``path``; None when there is no such file or it cannot be read now
    (another process holds a write lock on it, or it is not a SQLite file): then the store's own
    library decides, as before."""
    if not path.is_file():
        return None
    try:
        # mode=rw: never creates the file; read-write so that SQLite can roll back a transaction a
        # kill cut short (a read-only connection refuses to open a database with a hot journal).
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=rw", uri=True, timeout=5)
    except sqlite3.Error:
        return None
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        revision = None
        if "alembic_version" in tables:
            row = con.execute("SELECT version_num FROM alembic_version").fetchone()
            revision = row[0] if row else None
        rows = con.execute(f'SELECT COUNT(*) FROM "{work_table}"').fetchone()[0] if work_table in tables else 0
        return StoreState(tables, revision, rows)
    except sqlite3.Error:
        return None
    finally:
        con.close()


def open_whole(path: Path, url: str, build: Callable[[str], None], *, work_table: str,
               unfinished: Callable[[StoreState], str | None], what: str, advice: str) -> str | None:
    """Make sure the SQLite store ``path`` (reached as ``url``) is complete before its library opens it.

    * no store: it is built whole (:func:`create_whole`);
    * a store that ``unfinished`` gives a reason against (an earlier version was killed while
      creating it): with no rows in ``work_table`` it is moved aside (never deleted: it could be
      some other database) and built again, and the note returned says so; with rows, a one-line
      error ending in ``advice`` (``what`` names the store in both);
    * any other store is left to its library.

    ``build`` must leave no connection to the database open (dispose its engine): the file it made
    is renamed once it returns."""
    state = read_state(path, work_table)
    note = None
    reason = unfinished(state) if state is not None else None
    if reason is not None:
        if state.work_rows:
            raise WbsweepError(f"cannot use the {what} {path}: {reason}, and its {work_table} table holds "
                               f"{state.work_rows} row(s); {advice}")
        aside = set_aside(path)
        note = f"{path}: an unfinished {what} ({reason}) holding no {work_table}; moved to {aside.name}, made again"
    create_whole(path, url, build)
    return note


def create_whole(path: Path, url: str, build: Callable[[str], None]) -> bool:
    """Create the SQLite database ``path`` with ``build`` unless it exists; whether it was created here.

    ``build`` gets ``url`` pointing at a temporary file beside ``path`` (same folder: same
    filesystem, so the rename is atomic), named after this host and process so that a creation
    killed half way is recognised as such and removed by the next one."""
    remove_leftovers(path)  # also after a kill between linking the store and dropping its temporary name
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{_temporary_prefix(path)}{os.getpid()}")
    remove_database(tmp)
    try:
        build(with_database(url, tmp))
        return _link_into_place(tmp, path)
    finally:
        remove_database(tmp)  # linked: only a second name of the store; failed: a partial store


def _link_into_place(tmp: Path, path: Path) -> bool:
    """Give the finished store ``tmp`` the name ``path``, unless a store has that name by now
    (another process created it meanwhile: that one is kept, it may already hold work)."""
    for suffix in SIDE_FILES:  # a journal without its database would be applied to ours: not SQLite's
        stale = path.with_name(path.name + suffix)
        if stale.exists() and not path.exists():
            stale.unlink(missing_ok=True)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # a filesystem without hard links: a plain rename, after a last look
        if path.exists():
            return False
        os.replace(tmp, path)
        return True


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}.creating-{socket.gethostname()}-"


def remove_leftovers(path: Path) -> None:
    """Delete the temporary stores of creations of ``path`` on this host whose process is gone
    (killed while building it); those of a process still at work are left alone."""
    prefix = _temporary_prefix(path)
    for p in path.parent.glob(glob.escape(prefix) + "*"):
        pid = p.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            p.unlink(missing_ok=True)


def set_aside(path: Path) -> Path:
    """Rename the database ``path`` to ``<name>.unfinished-<time>`` with its journal files (a journal
    belongs to the file of its name: it must not stay behind for the next store); the new path."""
    aside = path.with_name(f"{path.name}.unfinished-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(path, aside)  # first: a kill before the journals follow leaves them without a database,
    for suffix in SIDE_FILES:  # which the next creation deletes (see _link_into_place)
        with contextlib.suppress(FileNotFoundError):
            os.replace(path.with_name(path.name + suffix), aside.with_name(aside.name + suffix))
    return aside


def remove_database(path: Path) -> None:
    """Delete a SQLite database file and the journal files beside it, if any."""
    for suffix in ("", *SIDE_FILES):
        with contextlib.suppress(FileNotFoundError):
            path.with_name(path.name + suffix).unlink()


def _process_alive(pid: int) -> bool:
    from orchestrator.record.folder_lock import pid_alive  # one test of liveness (a zombie counts as gone)

    return pid_alive(pid)


# --- MLflow's tracking store ----------------------------------------------------------------------------


def prepare_mlflow_store(db: Path, url: str, artifact_root: Path | str | None) -> str | None:
    """Make the SQLite tracking store ``db`` (reached as ``url``) whole before MLflow opens it (see
    :func:`open_whole`); a note when an unfinished one was made again. ``artifact_root``: see
    :func:`build_mlflow_store`."""
    return open_whole(db, url, lambda tmp_url: build_mlflow_store(tmp_url, artifact_root), work_table="runs",
                      unfinished=unfinished_mlflow_store, what="MLflow tracking store",
                      advice="restore it from a backup, or move it away to start a new store (the rows in "
                             "results/ stay; models trained before are not logged to MLflow again).")


def build_mlflow_store(url: str, artifact_root: Path | str | None) -> None:
    """Create a complete MLflow tracking store at the SQLite ``url`` (its tables, every schema
    migration, the Default experiment) as opening it would, leaving no connection open.
    ``artifact_root``, where the Default experiment keeps its artifacts: a folder, a URI (the
    server's ``mlflow-artifacts:/``) or None (MLflow's default)."""
    from mlflow.store.tracking import DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    root = artifact_root.resolve().as_uri() if isinstance(artifact_root, Path) else artifact_root
    store = SqlAlchemyStore(url, root or DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH)  # the class MlflowClient opens
    store.engine.dispose()


def unfinished_mlflow_store(state: StoreState) -> str | None:
    """Why an existing MLflow store is not one whose creation finished, or None.

    An interrupted migration leaves a table ``_alembic_tmp_<name>``; a store without runs must be
    at this MLflow's schema version (a creation cut short stops before it, and one without runs is
    best made again whole). A store with runs at an older version is MLflow's to upgrade."""
    from mlflow.store.db.utils import _get_latest_schema_revision  # what MLflow's own check compares with

    leftover = state.leftover_tables()
    if leftover:
        return f"an interrupted schema migration left the table {leftover[0]}"
    head = _get_latest_schema_revision()
    if state.work_rows == 0 and state.revision != head:
        return "its creation did not finish" if state.revision is None else \
            f"its schema version {state.revision} is not this MLflow's {head}"
    return None


# --- a folder moved or copied: its MLflow store's artifact locations ------------------------------------

#: The columns where MLflow's SQLite store records where artifacts live (absolute ``file:`` URIs).
ARTIFACT_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                    ("logged_models", "artifact_location"))


def recorded_artifact_homes(db: Path) -> set[str]:
    """The ``file:`` URIs of the ``mlartifacts`` folders the store ``db`` records its experiments'
    artifacts under: wbsweep makes an experiment's location ``<folder>/mlartifacts`` (the Default
    experiment's ``<folder>/mlartifacts/0``). Locations of any other form are not wbsweep's: left out."""
    con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
    try:
        rows = con.execute("SELECT experiment_id, artifact_location FROM experiments").fetchall()
    finally:
        con.close()
    homes = set()
    for exp_id, loc in rows:
        if not isinstance(loc, str) or not loc.startswith("file:"):
            continue
        loc = loc.rstrip("/")
        if loc.endswith(f"/mlartifacts/{exp_id}"):
            loc = loc[: -len(f"/{exp_id}")]
        if loc.endswith("/mlartifacts"):
            homes.add(loc)
    return homes


def _path_of(uri: str) -> Path:
    from urllib.parse import unquote, urlparse

    return Path(unquote(urlparse(uri).path))


def _same_folder(uri: str, home: Path) -> bool:
    try:
        return os.path.samefile(_path_of(uri).parent, home.parent)  # the folder reached by another path (a link)
    except OSError:
        return False


def repoint_artifacts(db: Path, home: Path) -> str | None:
    """Make the MLflow store ``db`` keep its artifacts under ``home`` (``DIR/mlartifacts``, beside it):
    a store whose folder was moved or copied records the old folder's absolute locations, where a
    copy would write its new artifacts (and a moved folder's old path would be made again). Every
    experiment location, run artifact URI and logged-model location under an old ``mlartifacts``
    (:func:`recorded_artifact_homes`) is rewritten to the same place under ``home``, in one SQLite
    transaction; the files themselves are where the move or copy put them. One line saying so, or
    None (nothing recorded elsewhere). MLflow has no public call that changes a location, hence SQL,
    here only (tests/test_folder_moves.py guards the columns)."""
    if not db.is_file():
        return None
    new = home.resolve().as_uri()
    olds = sorted(h for h in recorded_artifact_homes(db) if h != new and not _same_folder(h, home))
    if not olds:
        return None
    con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=rw", uri=True, timeout=60)
    counts = dict.fromkeys(t for t, _ in ARTIFACT_COLUMNS)
    try:
        with con:  # one transaction: all or nothing
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            for table, column in ARTIFACT_COLUMNS:
                if table not in tables:
                    continue
                n = 0
                for old in olds:
                    cur = con.execute(
                        f'UPDATE "{table}" SET "{column}" = ? || substr("{column}", ?) '
                        f'WHERE substr("{column}", 1, ?) = ? AND (length("{column}") = ? OR '
                        f'substr("{column}", ?, 1) = \'/\')',
                        (new, len(old) + 1, len(old), old, len(old), len(old) + 1))
                    n += cur.rowcount
                counts[table] = n
    finally:
        con.close()
    was = ", ".join(str(_path_of(old).parent) for old in olds)
    return (f"{db}: this folder was moved or copied from {was}: its MLflow store now keeps artifacts under {home} "
            f"({counts['experiments']} experiment(s), {counts['runs']} run(s) re-pointed); nothing is written to "
            "the old place")


# --- Optuna's studies -------------------------------------------------------------------------------------

OPTUNA_ADVICE = "move it away: the tune stages then search again, reusing every model trained."


def open_optuna_storage(path: Path):
    """The Optuna storage in the SQLite file ``path``, created whole if it does not exist, and a
    note when an unfinished one was made again (else None)."""
    import optuna

    path = path.resolve()
    url = f"sqlite:///{path}"
    note = open_whole(path, url, build_optuna_storage, work_table="trials", unfinished=unfinished_optuna_storage,
                      what="Optuna database", advice=OPTUNA_ADVICE)
    try:
        return optuna.storages.RDBStorage(url), note
    except Exception as exc:  # a damaged or foreign file: sqlalchemy's error, many lines
        raise WbsweepError(f"{path} is not a readable Optuna database ({type(exc).__name__}); "
                           f"{OPTUNA_ADVICE}") from None


def build_optuna_storage(url: str) -> None:
    """Create a complete Optuna storage at the SQLite ``url`` (its tables and version records),
    leaving no connection open."""
    import optuna

    storage = optuna.storages.RDBStorage(url)
    storage.remove_session()
    storage.engine.dispose()


def unfinished_optuna_storage(state: StoreState) -> str | None:
    """Why an existing Optuna storage is not one whose creation finished, or None: Optuna records
    its schema version (``alembic_version``) last; an interrupted migration leaves its copy of a table."""
    leftover = state.leftover_tables()
    if leftover:
        return f"an interrupted schema migration left the table {leftover[0]}"
    return "its creation did not finish" if state.revision is None else None
