"""The one exception type that means "the user asked for something we cannot do".

The CLI prints its message as a single line and exits with status 2, so every message must say
what is wrong and what to do about it. Programming errors stay ordinary exceptions (tracebacks).
"""


class WbsweepError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""
