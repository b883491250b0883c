"""One line for what went wrong in a Ray worker, instead of Ray's multi-line traceback text.

A task's error (`RayTaskError`) carries the original exception as `.cause`; an actor whose
`__init__` raised dies with an `ActorDiedError` that keeps only the text (Ray's traceback, its
last line `module.Type: message`). Either way the user sees the original message — a
`MergetuneError` (a config typo, a missing task file) as its own words, anything else as
`Type: message` — since the first line of Ray's text names only the worker process.
"""

from __future__ import annotations

import re

_EXCEPTION_LINE = re.compile(r"^(?P<type>[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Failed)): (?P<message>.*)$")
_OWN_ERRORS = "mergetune."


def _exception_line(exc: BaseException) -> str:
    from mergetune.core.errors import MergetuneError

    text = " ".join(str(exc).split()) or "(no message)"
    return text if isinstance(exc, MergetuneError) else f"{type(exc).__name__}: {text}"


def _from_text(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        found = _EXCEPTION_LINE.match(line)
        if found:
            kind = found["type"]
            if kind.startswith(_OWN_ERRORS):
                return found["message"]
            return f"{kind.rsplit('.', 1)[-1]}: {found['message']}"
    return lines[0] if lines else "(no message)"


def worker_error_message(exc: BaseException) -> str:
    """The original failure of a Ray task or actor as one line (see the module docstring)."""
    import ray.exceptions

    cause = getattr(exc, "cause", None)
    if isinstance(exc, ray.exceptions.RayTaskError) and isinstance(cause, BaseException):
        if not isinstance(cause, ray.exceptions.RayError):
            return _exception_line(cause)
        return _from_text(str(cause))
    if isinstance(exc, ray.exceptions.RayActorError) and not exc.actor_init_failed:
        # The process died (killed, out of memory, a crash): Ray's first line says so, its last why.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or ["the worker died"]
        return lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"
    return _from_text(str(exc))
