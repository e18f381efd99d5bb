"""Optional parts of glmtune and the extra that installs each: a missing one is a one-line error naming it."""

from __future__ import annotations

import importlib.util

from glmtune.errors import GlmtuneError


def require_extra(extra: str, *modules: str, needed_for: str) -> None:
    """Raise unless every module imports; the message names ``pip install 'glmtune[EXTRA]'``."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise GlmtuneError(f"{needed_for} needs {', '.join(missing)}: pip install 'glmtune[{extra}]'")
