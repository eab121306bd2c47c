"""Start or join the sweep's Ray cluster; the environment traps that stop Ray said in one line each.

Ray puts a local cluster's files under ``$RAY_TMPDIR/ray``, else ``$TMPDIR/ray`` (Linux), else
``/tmp/ray``: its session folder, logs, and the Unix sockets of the raylet and the object store.
What goes wrong there, and how it surfaces without this module:

* a long TMPDIR (an HPC job's scratch folder): a socket path passes the 107-byte limit of a Unix
  socket address and ``ray.init`` raises OSError (a traceback). Checked before Ray starts.
* a temp folder the user cannot write (``/tmp/ray`` made by another user on a shared machine) or a
  full disk: OSError from deep inside Ray. Checked before, and translated if Ray still fails.
* a stale session: ``ray start --head`` records its address in ``<temp>/ray/ray_current_cluster``
  and a plain ``ray.init()`` joins that cluster; one killed without ``ray stop`` leaves the file,
  and ``ray.init()`` then retries a dead address for minutes. Without ``--address`` a sweep starts
  a cluster of its own (``address="local"``, as ``wbsweep run --help`` says); ``--address auto``
  reads the file and says which address does not answer.

A local cluster picks free ports itself (a port in use is no trap); a remote one is checked for a
TCP answer before ``ray.init`` (:func:`orchestrator.sweep.cluster.check_reachable`).
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

from orchestrator.sweep.cluster import check_reachable
from trainables.errors import WbsweepError

#: The longest path of a Unix socket address: 108 bytes with the NUL on Linux, 104 on macOS.
SOCKET_MAX = (104 if sys.platform == "darwin" else 108) - 1
#: The longest session folder name Ray makes: session_<date>_<time>_<microseconds>_<pid up to 7 digits>.
_SESSION = "session_2026-01-01_00-00-00_000000_4194304"
#: The longest socket name in a session (``raylet`` is shorter).
_SOCKET = "plasma_store"
FIX = "set RAY_TMPDIR to a short folder of your own (e.g. RAY_TMPDIR=/tmp) and run again"


def ray_temp_root() -> tuple[str, str]:
    """The folder under which Ray makes its ``ray/`` folder, and what chose it (the variable or
    "default"), the way Ray reads them."""
    for var in ("RAY_TMPDIR", "TMPDIR") if sys.platform.startswith("linux") else ("RAY_TMPDIR",):
        if var in os.environ:
            return os.environ[var], var
    return "/tmp", "default"


def longest_socket_path(root: str) -> str:
    return os.path.join(root, "ray", _SESSION, "sockets", _SOCKET)


def check_local_start() -> None:
    """What would stop Ray from starting a local cluster here, as one line (WbsweepError)."""
    root, var = ray_temp_root()
    where = f"{var}={root}" if var != "default" else root
    path = longest_socket_path(root)
    if len(path.encode()) > SOCKET_MAX:
        room = SOCKET_MAX - (len(path.encode()) - len(root.encode()))
        raise WbsweepError(f"Ray cannot start here: under {where} ({len(root.encode())} characters) its socket paths "
                           f"would pass the {SOCKET_MAX}-byte limit of Unix sockets; {FIX} (at most {room} "
                           "characters).")
    folder = Path(root) / "ray"
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None and (not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK)):
        what = "is not a folder" if not existing.is_dir() else "is not writable by you"
        raise WbsweepError(f"Ray cannot start here: {existing} (Ray's temp folder under {where}) {what}; {FIX}.")


def stale_session_address() -> tuple[str, Path] | None:
    """The address ``ray start`` recorded for ``ray.init(address="auto")`` and its file, if any."""
    root, _ = ray_temp_root()
    path = Path(root) / "ray" / "ray_current_cluster"
    try:
        address = path.read_text().strip()
    except OSError:
        return None
    return (address, path) if address else None


def start_ray(address: str | None, quiet: bool) -> bool:
    """``ray.init`` for a sweep: join ``address`` (``auto``, HOST:PORT, $RAY_ADDRESS when no
    address is given) or start a local cluster. True when the cluster is local (started here: it
    never grows). Any failure is one line (WbsweepError)."""
    import ray


    env_address = os.environ.get("RAY_ADDRESS", "").strip()
    if address in (None, "local") and not (address is None and env_address):
        target, local = "local", True
    else:
        target, local = address or env_address, False
    if ray.is_initialized():
        return local
    if local:
        check_local_start()
    elif target == "auto" and not env_address:
        recorded = stale_session_address()
        if recorded is not None:
            try:
                check_reachable(recorded[0], "it")
            except WbsweepError as exc:
                why = str(exc).split(": ", 1)[-1].removesuffix("; is it running?")
                raise WbsweepError(f"--address auto: the Ray cluster recorded in {recorded[1]} ({recorded[0]}) "
                                   f"does not answer ({why}): stopped "
                                   "without `ray stop`? Start it again, delete that file, or give --address "
                                   "HOST:PORT.") from None
    elif target != "auto" and address is None:
        check_reachable(target, "the Ray cluster of $RAY_ADDRESS")
    try:
        # log_to_driver: the trials' warnings (a failed CUDA-graph capture, a GPU torch cannot use)
        # and the autoscaler's events ("Adding 2 node(s) of type a100") reach this output.
        ray.init(address=target, include_dashboard=False, logging_level="ERROR", log_to_driver=not quiet,
                 configure_logging=True)
    except ConnectionError as exc:
        raise WbsweepError(f"cannot join the Ray cluster at {target}: {_first_line(exc)}") from None
    except OSError as exc:
        raise WbsweepError(_os_error(exc, local)) from None
    except (RuntimeError, ValueError) as exc:
        raise WbsweepError(f"cannot start or join the Ray cluster at {target}: {_first_line(exc)}") from None
    return local


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _os_error(exc: OSError, local: bool) -> str:
    """One line for an OSError out of ``ray.init``, with the fix for the known causes."""
    root, var = ray_temp_root()
    where = f"{var}={root}" if var != "default" else root
    text = _first_line(exc)
    if "AF_UNIX path length" in text or exc.errno == errno.ENAMETOOLONG:
        return f"Ray cannot start here: its socket paths under {where} pass the {SOCKET_MAX}-byte limit; {FIX}."
    if exc.errno == errno.ENOSPC:
        return f"Ray cannot start here: no space left on the device of its temp folder ({where}); free space or {FIX}."
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"Ray cannot start here: {exc.filename or root} is not writable ({exc.strerror}); {FIX}."
    what = "start a local Ray cluster" if local else "join the Ray cluster"
    return f"cannot {what}: {type(exc).__name__}: {text} (Ray's temp folder: {where})."
