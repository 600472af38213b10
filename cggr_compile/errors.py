"""What CGGR does when it cannot route: a warning by default, an error in strict mode.

A *fallback* is any case where CGGR would train differently from what its options ask (the backend
compiles a graph unmodified, or the whole model serves as the router). Eval mode, ``no_grad`` and
calls without labels are not fallbacks: they run the plain model by design, silently.
"""

from __future__ import annotations

import warnings


class CGGRFallbackWarning(UserWarning):
    """CGGR could not route this step as asked and falls back (the message says why and what to do)."""


class CGGRFallbackError(RuntimeError):
    """Raised instead of :class:`CGGRFallbackWarning` when the option ``strict=True`` is set."""


def fall_back(message: str, strict: bool, stacklevel: int = 3) -> None:
    """Warn that CGGR falls back, or raise :class:`CGGRFallbackError` when ``strict``."""
    if strict:
        raise CGGRFallbackError(f"{message} (strict=True turns this fallback into an error)")
    warnings.warn(message, CGGRFallbackWarning, stacklevel=stacklevel)
