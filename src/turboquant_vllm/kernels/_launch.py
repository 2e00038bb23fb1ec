"""Kernel launches without Triton's per-call argument binding, and call plans replayed per layer.

`JITFunction.run` binds and specializes every argument on every launch (~25-30 us of host time per launch on
the H100 hosts, ~60% of an eager decode call's host cost). A decode step launches the same kernels with the
same integers in every layer; only the tensors differ. `Launcher` keys a compiled kernel on what Triton
specializes on (every non-tensor argument's value, every tensor's dtype and 16-byte alignment, the constexprs and
launch options, the device): the first launch of a key goes through Triton as usual and returns the compiled
kernel; later launches of the same key call its launcher directly, every tensor passed as its address (an
integer: Triton's launcher then skips the data_ptr() call and the driver's pointer query it makes per tensor).
`Replay` goes one step further ("plan once per step, run per layer"): the kernels' callers record the launches
of a call with each tensor argument named by its role, and a later call with the same key (the next layers of
the decode step: same shapes, strides, lengths) launches them with its own addresses and no planning at all.
Off in the interpreter, when a Triton launch hook is set (profilers), on Triton without `knobs`, or with
TQ_FAST_LAUNCH=0.
"""

from __future__ import annotations

import functools
import operator
import os

import torch

from ._common import interpreting

_MAX_ENTRIES = 1024  # keys kept per kernel (a new decode length is a new key); cleared when full


try:
    from triton import knobs as _knobs
except ImportError:  # Triton < 3.4: no knobs, keep Triton's own launch path
    _knobs = None


def _hooks_set() -> bool:
    if _knobs is None:
        return True
    for hook in (_knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


ENABLED = os.environ.get("TQ_FAST_LAUNCH", "1") != "0"  # read once; tests and benchmarks may flip it
POINTERS_AS_INTS = True  # reused launches pass tensors as their addresses (benchmarks may flip it)


def fast_launch_enabled() -> bool:
    """True when launches may skip Triton's binding (ENABLED, not interpreting, no launch hooks)."""
    return ENABLED and not interpreting() and not _hooks_set()


def _raw_stream(device: int) -> int:
    get = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # what Triton's own launch path calls
    return get(device) if get is not None else torch.cuda.current_stream(device).cuda_stream


_dtype_of = operator.attrgetter("dtype")


class Launcher:
    """`Launcher(jit_fn)(grid, args, constexprs, **options)` is `jit_fn[grid](*args, **constexprs, **options)`.

    args: the kernel's leading runtime arguments in signature order (tensors, ints, floats, bools);
    constexprs: the remaining parameters by name (missing ones take their defaults); options: num_warps,
    num_stages, maxnreg. The compiled kernel is reused for a launch with the same key (module docstring).
    """

    def __init__(self, fn):
        self.fn = fn
        self._split = None
        self._plans: dict[tuple, tuple] = {}
        self.hits = 0  # launches that skipped Triton's binding (tests, benchmarks)
        self.last: tuple | None = None  # (compiled kernel, trailing arguments) of the last fast-path launch

    def __call__(self, grid: tuple[int, int, int], args: tuple, constexprs: dict, **options):
        self.last = None
        if not fast_launch_enabled():
            return self.fn[grid](*args, **constexprs, **options)
        if self._split is None:  # which positions hold tensors: fixed by the kernel's signature
            tensor_pos = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
            other_pos = [i for i in range(len(args)) if i not in tensor_pos]
            self._split = (len(args), _getter(tensor_pos), _getter(other_pos), tuple(tensor_pos))
        n_args, get_tensors, get_others, tensor_pos = self._split
        if len(args) != n_args:  # another call pattern: Triton's own path
            return self.fn[grid](*args, **constexprs, **options)
        tensors = get_tensors(args)
        try:
            ptrs = tuple(map(torch.Tensor.data_ptr, tensors))
        except TypeError:  # something else where a tensor was: Triton's own path
            return self.fn[grid](*args, **constexprs, **options)
        # Triton specializes a pointer on 16-byte alignment: which pointers are off it is part of the key (the
        # cache's value norms sit 2 bytes after the key norms, so every decode step has one)
        aligned = () if not functools.reduce(operator.or_, ptrs) & 15 else tuple(p & 15 == 0 for p in ptrs)
        device = torch.cuda.current_device()
        key = (device, tuple(map(_dtype_of, tensors)), aligned, get_others(args), tuple(constexprs.items()),
               tuple(options.items()))  # fmt: skip
        plan = self._plans.get(key)
        if plan is None:
            kernel = self.fn[grid](*args, **constexprs, **options)
            if hasattr(kernel, "result"):  # asynchronous compilation
                kernel = kernel.result()
            tail = tuple(constexprs[p.name] if p.name in constexprs else p.default for p in self.fn.params[n_args:])
            if len(self._plans) >= _MAX_ENTRIES:
                self._plans.clear()
            self._plans[key] = self.last = (kernel, tail)
            return kernel
        kernel, tail = plan
        self.last = plan
        if POINTERS_AS_INTS:
            # the addresses as integers: Triton's launcher takes them as they are, where for a tensor it calls
            # data_ptr() and asks the driver about the pointer (cuPointerGetAttribute), once per tensor argument
            args = list(args)
            for i, p in zip(tensor_pos, ptrs, strict=True):
                args[i] = p
        kernel.run(grid[0], grid[1], grid[2], _raw_stream(device), kernel.function, kernel.packed_metadata, None,
                   None, None, *args, *tail)  # fmt: skip
        self.hits += 1
        return kernel


def run_compiled(kernel, tail: tuple, grid: tuple[int, int, int], args: list, device: int) -> None:
    """Launch a compiled kernel (from `Launcher.last`) on the current stream: args in signature order, every
    pointer as an integer address; tail: the trailing constexprs Triton's launcher expects."""
    kernel.run(grid[0], grid[1], grid[2], _raw_stream(device), kernel.function, kernel.packed_metadata, None, None,
               None, *args, *tail)  # fmt: skip


class Replay:
    """The launches of one call, recorded with every tensor argument replaced by its role ("q", "kp", ...), so a
    later call with the same key (same shapes, strides, dtypes, alignments, integers: the other layers of a
    decode step) launches the same compiled kernels with its own addresses and none of the planning.

    `Replay.build(named, launches)`: named maps each role to the call's tensor (or None); launches holds
    (grid, args, Launcher.last) per launch. None where a launch went through Triton's own path, where an argument
    is not among the named tensors, or where one tensor fills two roles (a later call might not alias them)."""

    __slots__ = ("launches",)

    def __init__(self, launches: list):
        self.launches = launches

    @staticmethod
    def build(named: dict, launches: list):
        roles = {}
        for role, t in named.items():
            if t is None:
                continue
            if id(t) in roles:
                return None
            roles[id(t)] = role
        recorded = []
        for grid, args, last in launches:
            if last is None:
                return None
            template, slots = list(args), []
            for i, a in enumerate(args):
                if isinstance(a, torch.Tensor):
                    role = roles.get(id(a))
                    if role is None:
                        return None
                    slots.append((i, role))
                    template[i] = None
            recorded.append((last[0], last[1], grid, template, tuple(slots)))
        return Replay(recorded)

    def run(self, ptr: dict, device: int) -> None:
        """Launch every recorded kernel with the addresses ptr[role] (integers) on the current stream."""
        for kernel, tail, grid, template, slots in self.launches:
            args = list(template)
            for i, role in slots:
                args[i] = ptr[role]
            run_compiled(kernel, tail, grid, args, device)


def _getter(positions: list[int]):
    """args -> tuple of args[i] for i in positions (operator.itemgetter, always a tuple)."""
    if not positions:
        return lambda args: ()
    if len(positions) == 1:
        i = positions[0]
        return lambda args: (args[i],)
    return operator.itemgetter(*positions)
