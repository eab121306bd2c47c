"""The one exception type that means "the user asked for something we cannot do".

The CLI prints its message as a single line and exits with status 2, so every message must say
what is wrong and what to do about it. Programming errors stay ordinary exceptions (tracebacks).
"""


import difflib
from collections.abc import Iterable, Iterator


class WbsweepError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""


def unknown_name(kind: str, name: str, known: Iterable[str], extra: str = "") -> WbsweepError:
    """The error for a name that is not in a registry, suggesting the closest known one."""
    known = list(known)
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return WbsweepError(f"unknown {kind} '{name}'.{hint} Known {kind}s: {', '.join(known)}{extra}.")


def exception_chain(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling (``__cause__``, else
    ``__context__``), outermost first, each once even if the chain loops back."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


# --- a full disk ---------------------------------------------------------------------------------

#: How each layer says "no space": the OS (ENOSPC, EDQUOT), SQLite, PyTorch's zip writer (which hides
#: the OSError; :func:`trainables.run_files` turns it into ENOSPC where the disk is full).
DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "database or disk is full",
                   "[Errno 28]", "[Errno 122]")


def disk_full_cause(exc: BaseException | None) -> BaseException | None:
    """The exception in ``exc``'s chain that says a disk (or a quota) is full, or None."""
    import errno

    for e in exception_chain(exc):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return e
        if says_disk_full(str(e)):  # SQLite's OperationalError, a trial's error text through Ray
            return e
    return None


def disk_full_reason(exc: BaseException) -> str:
    """What ``exc``'s chain says about the full disk, short, on one line (SQLAlchemy's text would add
    its statement and an autoflush note): "No space left on device while writing X", or just the
    marker; ``exc``'s own first line where nothing in it says so."""
    cause = disk_full_cause(exc) or exc
    text = " ".join(str(cause).split())
    if isinstance(cause, OSError) and cause.errno is not None and cause.strerror:
        return cause.strerror  # (its filename may be the source of a copy, not where space ran out)
    for marker in DISK_FULL_TEXTS[:3]:
        if marker in text and len(text) > 200:
            return marker
    return f"{type(cause).__name__}: {text[:200]}"


def says_disk_full(text: str) -> bool:
    return any(t in text for t in DISK_FULL_TEXTS)


def _usage(path: object):
    """shutil.disk_usage of ``path`` or of its nearest existing parent (None if unreadable)."""
    import shutil
    from pathlib import Path

    p = Path(str(path)).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p)
    except OSError:
        return None


def free_bytes(path: object) -> int | None:
    """Free space (for this user) on the disk holding ``path``."""
    usage = _usage(path)
    return usage.free if usage else None


def nearly_full(path: object) -> bool:
    """Whether the disk of ``path`` has (almost) no space left: under 1 MiB, or under 64 KiB on a
    disk smaller than 6.4 MiB (1 % of it, at least 64 KiB, at most 1 MiB)."""
    usage = _usage(path)
    return usage is not None and usage.free < min(1 << 20, max(usage.total // 100, 64 << 10))


def size_text(n: int | None) -> str:
    if n is None:
        return "? bytes"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"  # pragma: no cover
