"""A results folder has one owner: ``DIR/.wbsweep.lock``, taken by every command that writes the folder.

The lock file names its holder: host, pid, the process's start time (``/proc/<pid>/stat``, so a pid
the system has given to another process since is not taken for the holder), the machine's boot id,
the command, when it started, and a heartbeat: the time it was last rewritten, every
``WBSWEEP_HEARTBEAT_S`` seconds (default 15), by a thread of the holder, and by the sweep's
watchdog on each of its heartbeats (orchestrator/sweep/watchdog.py, through the sweep's context).

Taking it (:meth:`FolderLock.acquire`):

* no lock file: the lock is made whole under a temporary name and hard-linked to its real name,
  which fails when another process linked first (no window where two believe they hold it);
* a lock of a **live** holder: refused in one line naming it (:class:`FolderBusy`, exit status 2).
  Live means, on this machine (same host name and boot id), that its pid runs and is the process
  that took the lock (same start time; a zombie is dead); from another machine (a folder shared
  over NFS, or a host name two machines share), that its heartbeat is fresh: younger than
  ``STALE_BEATS`` of its heartbeats and at least ``STALE_MIN_S`` (the clocks of the machines must
  agree to well within that, as NTP keeps them);
* a **stale** lock (its process gone, its pid another process now, its heartbeat too old): taken
  over with one line saying whose it was and why. The stale file is first renamed aside, and read
  back: if it is not the one judged stale (another process took the lock meanwhile), it is put back.

The holder's heartbeat also checks that the lock is still its own: a driver whose lock was taken
over (its machine suspended beyond the limit, then woken up) learns it from :meth:`FolderLock.beat`,
and the sweep stops in one line instead of writing beside the new owner.

Heartbeats and the stale limit compare wall-clock times (``time.time``) because they are written
by one process (maybe on one machine) and read by another: a monotonic clock means nothing outside
its process.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from orchestrator.environment import env_seconds
from trainables.errors import WbsweepError

LOCK_NAME = ".wbsweep.lock"
#: A lock from another machine is stale once its heartbeat is older than this many of its
#: heartbeats, and at least STALE_MIN_S.
STALE_BEATS = 10
STALE_MIN_S = 60.0


class FolderBusy(WbsweepError):
    """Another live command holds the folder: one line naming it (``holder``), exit status 2."""

    def __init__(self, message: str, holder: Holder | None = None):
        super().__init__(message)
        self.holder = holder


def heartbeat_s() -> float:
    """How often a holder rewrites its lock (``WBSWEEP_HEARTBEAT_S``, as the status file's heartbeat)."""
    return max(0.1, env_seconds("WBSWEEP_HEARTBEAT_S", 15.0))


def command_line() -> str:
    """This process's command as the user typed it (``wbsweep run ...``)."""
    return " ".join(["wbsweep", *sys.argv[1:]])


# --- processes ------------------------------------------------------------------------------------------


def process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, ``/proc/<pid>/stat`` field 22), or None
    where that cannot be read (no such process, no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def boot_id() -> str | None:
    """This machine's boot id (Linux), or None: two lock files with the same one come from the same
    boot of the same machine, so their pids can be checked here."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return not _zombie(pid)


# --- what a lock file says --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    pid_start: str | None
    boot: str | None
    command: str
    started: float  # wall clock (epoch seconds)
    heartbeat: float  # wall clock of the last rewrite
    heartbeat_s: float
    token: str  # unique per acquisition

    @classmethod
    def me(cls, token: str, started: float, command: str) -> Holder:
        now = time.time()
        return cls(socket.gethostname(), os.getpid(), process_start(os.getpid()), boot_id(), command, started, now,
                   heartbeat_s(), token)

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        try:
            d = json.loads(text)
            return cls(str(d["host"]), int(d["pid"]), d.get("pid_start"), d.get("boot"), str(d.get("command", "?")),
                       float(d["started"]), float(d["heartbeat"]), float(d["heartbeat_s"]), str(d["token"]))
        except (ValueError, TypeError, KeyError, AttributeError):
            return None

    def text(self) -> str:
        return json.dumps({**self.__dict__, "started_utc": _utc(self.started),
                           "heartbeat_utc": _utc(self.heartbeat)}, indent=2)

    def same_machine(self) -> bool:
        """Whether the holder ran on this machine in this boot (its pid means something here)."""
        mine = boot_id()
        return self.host == socket.gethostname() and (self.boot is None or mine is None or self.boot == mine)

    def stale_because(self, now: float | None = None) -> str | None:
        """Why the holder no longer holds the folder, or None (it is live)."""
        if self.same_machine():
            if not pid_alive(self.pid):
                return "its process is gone"
            now_start = process_start(self.pid)
            if self.pid_start is not None and now_start is not None and now_start != self.pid_start:
                return f"pid {self.pid} is another process now"
            return None
        age = (time.time() if now is None else now) - self.heartbeat
        limit = max(STALE_MIN_S, STALE_BEATS * self.heartbeat_s)
        if age > limit:
            return f"its heartbeat is {_age(age)} old (a holder on another machine rewrites it every " \
                   f"{self.heartbeat_s:g} s; stale after {limit:g} s)"
        return None

    def describe(self, heartbeat: bool = True) -> str:
        beat = f", last heartbeat {_age(max(0.0, time.time() - self.heartbeat))} ago" if heartbeat else ""
        return f"`{self.command}` (pid {self.pid} on {self.host}, since {_utc(self.started)}{beat})"


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _age(seconds: float) -> str:
    s = int(seconds)
    return f"{s} s" if s < 120 else f"{s // 60} min" if s < 7200 else f"{s // 3600} h"


def read_holder(path: Path, tries: int = 5) -> Holder | None:
    """The holder a lock file names; None when there is no lock file. A file that is not a lock of
    ours (after a few tries: one made without hard links may be read while it is being written) is a
    one-line error: it is not ours to remove."""
    for i in range(tries):
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError):
            text = ""
        holder = Holder.parse(text)
        if holder is not None:
            return holder
        if i < tries - 1:
            time.sleep(0.1)
    raise FolderBusy(f"{path} is not a wbsweep lock (unreadable); if no wbsweep command runs on {path.parent}, "
                     "delete it and run the command again.")


# --- the lock -------------------------------------------------------------------------------------------


class FolderLock:
    """The lock of one or more folders (``--out``, and a local ``--storage`` apart from it), held
    by one command from :meth:`acquire` to :meth:`release`. ``note`` tells the user of a take-over."""

    def __init__(self, folders: list[Path], note: Callable[[str], None], command: str | None = None):
        self.paths = [Path(f) / LOCK_NAME for f in dict.fromkeys(Path(f).resolve() for f in folders)]
        self.note, self.command = note, command or command_line()
        self.token = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex}"
        self.started = time.time()
        self.held: list[Path] = []
        self.lost: str | None = None  # why a held lock is no longer ours
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __getstate__(self) -> dict:
        """A copy (Ray Tune pickles its callbacks, which hold the sweep's context) holds nothing:
        only the command that took the lock beats and releases it."""
        return {**self.__dict__, "held": [], "_mutex": None, "_stop": None, "_thread": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _mutex=threading.Lock(), _stop=threading.Event())

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> FolderLock:
        """Take every folder's lock, or none: :class:`FolderBusy` names the live holder."""
        try:
            for path in self.paths:
                self._take(path)
                self.held.append(path)
        except BaseException:
            self.release()
            raise
        self._thread = threading.Thread(target=self._keep_alive, name="wbsweep-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _mine(self) -> Holder:
        return Holder.me(self.token, self.started, self.command)

    def _take(self, path: Path) -> None:
        _remove_leftovers(path)
        tmp = path.with_name(f"{LOCK_NAME}.{socket.gethostname()}-{os.getpid()}.tmp")
        try:
            tmp.write_text(self._mine().text())
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise WbsweepError(f"cannot write the lock {path} ({exc.strerror or exc}): this command writes into "
                               f"{path.parent}; make it writable (or free space there), or give another folder.") \
                from None
        try:
            for _ in range(20):  # each round either links, refuses, or removes a stale lock
                if _link(tmp, path):
                    return
                holder = read_holder(path)
                if holder is None:
                    continue  # released meanwhile
                if holder.token == self.token:
                    return
                why = holder.stale_because()
                if why is None:
                    raise FolderBusy(f"{path.parent} is in use by {holder.describe()}; wait for it to end (or stop "
                                     "it), or give another folder. Read-only commands (status, report) work "
                                     "meanwhile.", holder)
                if self._remove_stale(path, holder):
                    self.note(f"took over the results folder {path.parent} from {holder.describe(heartbeat=False)}: "
                              f"{why}")
            raise FolderBusy(f"cannot take the lock {path}: other commands keep taking it; try again.")
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def _remove_stale(path: Path, holder: Holder) -> bool:
        """Rename the stale lock ``holder`` aside and delete it; if what was renamed is another lock
        (taken meanwhile), put it back. Whether the stale one is gone."""
        aside = path.with_name(f"{LOCK_NAME}.stale-{socket.gethostname()}-{os.getpid()}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return False
        moved = Holder.parse(aside.read_text()) if aside.exists() else None
        if moved is not None and moved.token != holder.token:
            with contextlib.suppress(FileExistsError):
                _link(aside, path)
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True

    def beat(self) -> str | None:
        """Rewrite the heartbeat of every lock held; why the folder is no longer this command's (a
        lock file gone, or another command's now), else None."""
        with self._mutex:
            if self.lost is not None or not self.held:
                return self.lost
            for path in self.held:
                holder = None
                for _ in range(10):  # a take-over renames it aside for an instant, and may put it back
                    try:
                        holder = read_holder(path, tries=1)
                    except FolderBusy:
                        holder = None
                    if holder is not None:
                        break
                    time.sleep(0.1)
                if holder is None or holder.token != self.token:
                    who = "its lock file was removed" if holder is None else f"it is held by {holder.describe()} now"
                    self.lost = (f"the results folder {path.parent} is no longer this command's ({who}): another "
                                 "command took it over")
                    return self.lost
                tmp = path.with_name(f"{LOCK_NAME}.{socket.gethostname()}-{os.getpid()}.beat")
                try:
                    tmp.write_text(self._mine().text())
                    os.replace(tmp, path)
                except OSError:  # a full disk: the heartbeat ages, a holder on this machine is still seen live
                    tmp.unlink(missing_ok=True)
            return None

    def _keep_alive(self) -> None:
        interval = heartbeat_s()
        while not self._stop.wait(interval):
            if self.beat() is not None:
                return

    def release(self) -> None:
        """Give every lock held back (those still this command's); on every way out."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        with self._mutex:
            for path in self.held:
                with contextlib.suppress(OSError, FolderBusy):
                    holder = read_holder(path, tries=1)
                    if holder is not None and holder.token == self.token:
                        path.unlink()
            self.held = []


def _remove_leftovers(path: Path) -> None:
    """Delete the temporary files (``<lock>.<host>-<pid>.tmp`` / ``.beat``, ``<lock>.stale-<host>-<pid>``)
    that processes of this machine killed while writing them left beside the lock ``path``."""
    import glob

    here = socket.gethostname()
    for p in path.parent.glob(glob.escape(path.name) + ".*"):
        name = p.name[len(path.name) + 1:].removeprefix("stale-").removesuffix(".tmp").removesuffix(".beat")
        host, _, pid = name.rpartition("-")
        if host == here and pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            p.unlink(missing_ok=True)


def _link(tmp: Path, path: Path) -> bool:
    """Give the whole file ``tmp`` the name ``path`` unless a file has that name; whether it was given."""
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # a filesystem without hard links: create-exclusive, then write
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            fh.write(tmp.read_text())
        return True


def holder_of(folder: Path) -> Holder | None:
    """The live holder of ``folder``'s lock, or None (no lock, or a stale one)."""
    try:
        holder = read_holder(Path(folder) / LOCK_NAME)
    except FolderBusy:
        return None
    return holder if holder is not None and holder.stale_because() is None else None

