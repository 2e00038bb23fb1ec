"""Shared helpers for the Triton kernels: backend choice and input checks."""

from __future__ import annotations

import contextlib
import functools
import os

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """True when Triton runs in its CPU interpreter (TRITON_INTERPRET=1, set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


_pytorch_only = False


@contextlib.contextmanager
def pytorch_only():
    """Inside this block every kernel entry point runs its PyTorch path (e.g. to keep CPU tests that
    exercise the cache, not the kernels, out of the slow Triton interpreter)."""
    global _pytorch_only
    previous, _pytorch_only = _pytorch_only, True
    try:
        yield
    finally:
        _pytorch_only = previous


def use_triton(*tensors: torch.Tensor) -> bool:
    """Run the Triton kernel for these tensors? CUDA tensors, or any tensor when interpreting."""
    if _pytorch_only or not triton_available():
        return False
    if all(t.is_cuda for t in tensors):
        return True
    return interpreting() and all(t.device.type == "cpu" for t in tensors)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def check_tensor(
    t: torch.Tensor,
    name: str,
    *,
    ndim: int | None = None,
    dtypes: tuple[torch.dtype, ...] | None = None,
    device: torch.device | None = None,
) -> None:
    """TypeError/ValueError naming the argument, the expected and the actual value."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")


def check_finite(t: torch.Tensor, name: str) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf values")


def version_of(t: torch.Tensor) -> int | None:
    """The in-place edit counter of `t` for memo checks; None for inference tensors (made under
    torch.inference_mode), which keep no counter: a memo keyed on them checks identity only."""
    return None if t.is_inference() else t._version
