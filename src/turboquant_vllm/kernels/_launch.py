"""Kernel launches without Triton's per-call argument binding.

`JITFunction.run` binds and specializes every argument on every launch (~25-30 us of host time per launch on
the H100 hosts, ~60% of an eager decode call's host cost). A decode step launches the same kernels with the
same integers in every layer; only the tensors differ. `Launcher` keys a compiled kernel on what Triton
specializes on (every non-tensor argument's value, every tensor's dtype and 16-byte alignment, the constexprs
and launch options, the device): the first launch of a key goes through Triton as usual and returns the
compiled kernel; later launches of the same key call its launcher directly ("plan once per step, run per
layer"). Off in the interpreter, when a Triton launch hook is set (profilers), on Triton without `knobs`, or
with TQ_FAST_LAUNCH=0.
"""

from __future__ import annotations

import os

import torch

from ._common import interpreting

_MAX_ENTRIES = 1024  # keys kept per kernel (a new decode length is a new key); cleared when full


def _hooks_set() -> bool:
    try:
        from triton import knobs
    except ImportError:  # Triton < 3.4: no knobs, keep Triton's own launch path
        return True
    for hook in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


def fast_launch_enabled() -> bool:
    """True when launches may skip Triton's binding (GPU, no launch hooks, TQ_FAST_LAUNCH not 0)."""
    return os.environ.get("TQ_FAST_LAUNCH", "1") != "0" and not interpreting() and not _hooks_set()


def _raw_stream(device: int) -> int:
    get = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # what Triton's own launch path calls
    return get(device) if get is not None else torch.cuda.current_stream(device).cuda_stream


def _arg_key(args: tuple) -> tuple:
    """What Triton specializes a launch on: tensors by dtype and 16-byte alignment, the rest by value."""
    return tuple((a.dtype, a.data_ptr() & 15 == 0) if isinstance(a, torch.Tensor) else a for a in args)


class Launcher:
    """`Launcher(jit_fn)(grid, args, constexprs, **options)` is `jit_fn[grid](*args, **constexprs, **options)`.

    args: the kernel's leading runtime arguments in signature order (tensors, ints, floats, bools);
    constexprs: the remaining parameters by name (missing ones take their defaults); options: num_warps,
    num_stages, maxnreg. The compiled kernel is reused for a launch with the same key (module docstring).
    """

    def __init__(self, fn):
        self.fn = fn
        self._plans: dict[tuple, tuple] = {}
        self.hits = 0  # launches that skipped Triton's binding (tests, benchmarks)

    def __call__(self, grid: tuple[int, int, int], args: tuple, constexprs: dict, **options):
        if not fast_launch_enabled():
            return self.fn[grid](*args, **constexprs, **options)
        device = torch.cuda.current_device()
        key = (device, tuple(constexprs.items()), tuple(options.items()), _arg_key(args))
        plan = self._plans.get(key)
        if plan is None:
            kernel = self.fn[grid](*args, **constexprs, **options)
            if hasattr(kernel, "result"):  # asynchronous compilation
                kernel = kernel.result()
            tail = tuple(constexprs[p.name] if p.name in constexprs else p.default for p in self.fn.params[len(args) :])
            if len(self._plans) >= _MAX_ENTRIES:
                self._plans.clear()
            self._plans[key] = (kernel, tail)
            return kernel
        kernel, tail = plan
        stream = _raw_stream(device)
        kernel.run(grid[0], grid[1], grid[2], stream, kernel.function, kernel.packed_metadata, None, None, None,
                   *args, *tail)  # fmt: skip
        self.hits += 1
        return kernel
