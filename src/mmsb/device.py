"""Device detection. GPU and unified pages need a usable CUDA device through PyTorch."""

from __future__ import annotations

import importlib.util
from functools import lru_cache

__all__ = ["cuda_available", "cuda_unavailable_reason"]


@lru_cache(maxsize=1)
def cuda_unavailable_reason() -> str | None:
    """None when a CUDA device is usable, else a sentence saying what is missing."""
    if importlib.util.find_spec("torch") is None:
        return ("PyTorch is not installed; install the 'gpu' extra (pip install 'mmsb[gpu]') "
                "on a machine with an NVIDIA GPU")
    try:
        import torch
    except Exception as exc:  # a broken torch install must not break MMSB
        return f"PyTorch failed to import ({exc})"
    if not torch.cuda.is_available():
        return "PyTorch reports no usable CUDA device (torch.cuda.is_available() is False)"
    return ("this build keeps page bytes in host memory only: device-resident pages are "
            "not part of this release")


def cuda_available() -> bool:
    """True when a CUDA device is usable."""
    if importlib.util.find_spec("torch") is None:
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False
