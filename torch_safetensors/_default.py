"""The process-wide default format of ``torch.save``: one switch for unchanged code.

``TORCH_SAFETENSORS_FORMAT=safetensors`` in the environment (read when this module is
imported) or :func:`set_default_format` from code makes every ``torch.save`` call that
passes no ``format`` write safetensors, to paths and file objects alike.
``TORCH_SAFETENSORS_FALLBACK=pickle`` (or ``fallback="pickle"``) lets one call whose
object cannot be stored write pickle instead, with a :class:`PickleFallbackWarning`.
The startup hook (``_torch_safetensors_startup``) only makes sure this package is
imported in processes that never import it themselves.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

__all__ = ["PickleFallbackWarning", "get_default_format", "set_default_format"]

ENV_FORMAT = "TORCH_SAFETENSORS_FORMAT"
ENV_FALLBACK = "TORCH_SAFETENSORS_FALLBACK"
FORMATS = ("safetensors", "pickle")
FALLBACKS = ("pickle",)


class PickleFallbackWarning(UserWarning):
    """A ``torch.save`` call wrote pickle because its object cannot be stored as
    safetensors and the fallback to pickle is on."""


def _check(format: object, fallback: object, *, source: str) -> Tuple[str, Optional[str]]:
    if format not in FORMATS:
        raise ValueError(f"{source}: the default format must be one of "
                         f"{', '.join(map(repr, FORMATS))}, not {format!r}")
    if fallback is not None and fallback not in FALLBACKS:
        raise ValueError(f"{source}: fallback must be None or 'pickle', not {fallback!r}")
    return str(format), (None if fallback is None else str(fallback))


def _from_environment() -> Tuple[str, Optional[str]]:
    """The (format, fallback) the environment asks for; unset or empty means pickle.

    Raises:
        ValueError: a value that is neither, in one line that names the variable.
    """
    raw_format = os.environ.get(ENV_FORMAT, "")
    raw_fallback = os.environ.get(ENV_FALLBACK, "")
    fmt = raw_format.strip().lower() or "pickle"
    fallback = raw_fallback.strip().lower() or None
    if fallback == "error":
        fallback = None
    if fmt not in FORMATS:
        raise ValueError(f"{ENV_FORMAT}={raw_format!r} is not a format: set it to 'safetensors' or "
                         "'pickle', or unset it")
    if fallback is not None and fallback not in FALLBACKS:
        raise ValueError(f"{ENV_FALLBACK}={raw_fallback!r} is not a fallback: set it to 'pickle' or "
                         "'error', or unset it")
    return _check(fmt, fallback, source="the environment")


try:
    _format, _fallback = _from_environment()
except ValueError as _e:
    # A misspelt variable stops the program before it writes a checkpoint in a format
    # nobody asked for: one line, not a traceback through importlib (this often runs
    # inside "import torch", from the startup hook).
    raise SystemExit(f"torch_safetensors: {_e}") from None


def set_default_format(format: str, *, fallback: Optional[str] = None) -> None:
    """Sets the format ``torch.save`` writes when a call passes no ``format``.

    Paths ending in ``.safetensors`` are always written as safetensors, and
    ``format="pickle"`` (or ``"safetensors"``) on one call always wins.

    Args:
        format: ``"safetensors"`` or ``"pickle"`` (torch's own format, the default).
        fallback: ``None`` (default): with safetensors, an object that cannot be stored
            raises ``TypeError`` naming its path. ``"pickle"``: that one call writes
            pickle instead and warns with :class:`PickleFallbackWarning`.

    Raises:
        ValueError: an unknown format or fallback.

    Example:
        >>> torch_safetensors.set_default_format("safetensors", fallback="pickle")
        >>> torch.save(model.state_dict(), buffer)   # a safetensors file in the buffer
    """
    global _format, _fallback
    _format, _fallback = _check(format, fallback, source="set_default_format")


def get_default_format() -> str:
    """The format ``torch.save`` writes when a call passes none: ``"safetensors"`` or
    ``"pickle"``."""
    return _format


def fallback() -> Optional[str]:
    """The fallback for objects safetensors cannot store: ``None`` or ``"pickle"``."""
    return _fallback
