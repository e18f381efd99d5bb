"""The one exception type that the CLI turns into a one-line message instead of a traceback."""


class GlmtuneError(Exception):
    """A user-facing error: bad input, bad flags, a run that cannot go on."""
