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
