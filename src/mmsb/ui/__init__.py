"""``mmsb ui``: a read-only web inspector of a durable bus or a checkpoint file.

Needs the extra ``mmsb[ui]`` (Starlette and uvicorn); :func:`require_web_stack` says so
in one line when they are missing. See docs/Inspector.md.
"""

from __future__ import annotations

from typing import Any

from ..errors import MMSBError

__all__ = ["require_web_stack", "UIUnavailableError"]


class UIUnavailableError(MMSBError):
    """The inspector's web stack is not installed."""


def require_web_stack() -> Any:
    """Import the web stack, or raise UIUnavailableError naming the extra to install."""
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        raise UIUnavailableError(
            "mmsb ui needs Starlette and uvicorn, which are not installed; install the "
            "extra: pip install 'mmsb[ui]'") from None
    return uvicorn
