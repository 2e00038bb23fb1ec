"""kernels/_launch.py: which launches reuse a compiled kernel, and the arguments its launcher receives."""

from __future__ import annotations

import inspect

import pytest
import torch

import turboquant_vllm.kernels._launch as launch


class _Param:
    def __init__(self, name, default=inspect.Parameter.empty):
        self.name, self.default = name, default
        self.has_default = default is not inspect.Parameter.empty


class _Kernel:
    function, packed_metadata = "fn", "meta"

    def __init__(self):
        self.calls = []

    def run(self, *args):
        self.calls.append(args)


class _Fn:
    """Stands for a JITFunction(x_ptr, n, scale, BLOCK: constexpr, FLAG: constexpr = True)."""

    def __init__(self):
        self.params = [_Param("x_ptr"), _Param("n"), _Param("scale"), _Param("BLOCK"), _Param("FLAG", True)]
        self.bound = []
        self.kernels = []

    def __getitem__(self, grid):
        def bind(*args, **kwargs):
            self.bound.append((grid, args, kwargs))
            self.kernels.append(_Kernel())
            return self.kernels[-1]

        return bind


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(launch, "fast_launch_enabled", lambda: True)
    monkeypatch.setattr(launch.torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(launch, "_raw_stream", lambda device: 1234)


def test_second_identical_launch_skips_binding(fast):
    fn = _Fn()
    run = launch.Launcher(fn)
    x = torch.zeros(64)
    run((4, 1, 1), (x, 10, 0.5), dict(BLOCK=16), num_warps=4)
    assert len(fn.bound) == 1 and run.hits == 0
    y = torch.ones(64)  # another tensor, same dtype and alignment
    run((8, 2, 1), (y, 10, 0.5), dict(BLOCK=16), num_warps=4)
    assert len(fn.bound) == 1 and run.hits == 1
    (call,) = fn.kernels[0].calls
    assert call[:4] == (8, 2, 1, 1234)  # the new grid, the current stream
    assert call[4:9] == ("fn", "meta", None, None, None)
    assert call[9] is y and call[10:] == (10, 0.5, 16, True)  # signature order, defaults filled


@pytest.mark.parametrize(
    "args, constexprs, options",
    [
        ((torch.zeros(64), 11, 0.5), dict(BLOCK=16), dict(num_warps=4)),  # an integer's value
        ((torch.zeros(64), 10, 0.25), dict(BLOCK=16), dict(num_warps=4)),  # a float's value
        ((torch.zeros(64, dtype=torch.float16), 10, 0.5), dict(BLOCK=16), dict(num_warps=4)),  # a dtype
        ((torch.zeros(64), 10, 0.5), dict(BLOCK=32), dict(num_warps=4)),  # a constexpr
        ((torch.zeros(64), 10, 0.5), dict(BLOCK=16, FLAG=False), dict(num_warps=4)),  # a defaulted constexpr
        ((torch.zeros(64), 10, 0.5), dict(BLOCK=16), dict(num_warps=8)),  # a launch option
    ],
)
def test_what_triton_specializes_on_goes_through_triton(fast, args, constexprs, options):
    fn = _Fn()
    run = launch.Launcher(fn)
    run((1, 1, 1), (torch.zeros(64), 10, 0.5), dict(BLOCK=16), num_warps=4)
    run((1, 1, 1), args, constexprs, **options)
    assert len(fn.bound) == 2 and run.hits == 0
    assert fn.bound[1][1][0] is args[0]


def test_misaligned_pointer_is_its_own_key(fast):
    """Triton compiles a pointer off 16-byte alignment differently: its launches reuse their own kernel, never
    the aligned one's (and the other way round)."""
    fn = _Fn()
    run = launch.Launcher(fn)
    x = torch.zeros(65)
    for _ in range(2):
        run((1, 1, 1), (x, 10, 0.5), dict(BLOCK=16))
    for _ in range(2):
        run((1, 1, 1), (x[1:], 10, 0.5), dict(BLOCK=16))  # 4 bytes off
    run((1, 1, 1), (x, 10, 0.5), dict(BLOCK=16))
    assert len(fn.bound) == 2 and run.hits == 3
    assert [len(k.calls) for k in fn.kernels] == [2, 1]  # aligned: 2 reuses; misaligned: 1
    assert fn.kernels[1].calls[0][9].data_ptr() == x.data_ptr() + 4


def test_another_call_pattern_goes_through_triton(fast):
    fn = _Fn()
    run = launch.Launcher(fn)
    run((1, 1, 1), (torch.zeros(4), 10, 0.5), dict(BLOCK=16))
    run((1, 1, 1), (torch.zeros(4), torch.zeros(4), 0.5), dict(BLOCK=16))  # a tensor where an int was
    run((1, 1, 1), (torch.zeros(4), 10), dict(BLOCK=16, scale=0.5))  # fewer positional arguments
    assert len(fn.bound) == 3 and run.hits == 0


def test_disabled_always_binds(monkeypatch):
    monkeypatch.setattr(launch, "ENABLED", False)
    assert not launch.fast_launch_enabled()
    fn = _Fn()
    run = launch.Launcher(fn)
    for _ in range(3):
        run((1, 1, 1), (torch.zeros(4), 1, 1.0), dict(BLOCK=16))
    assert len(fn.bound) == 3 and run.hits == 0


def test_off_in_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not launch.fast_launch_enabled()


def test_launcher_wraps_the_kernels():
    from turboquant_vllm.kernels import tq_attention, tq_compress

    assert tq_attention._ATTN.fn is tq_attention._tq_attn_kernel
    assert tq_attention._QROT.fn is tq_attention._tq_qrot_kernel
    assert tq_attention._REDUCE.fn is tq_attention._tq_reduce_kernel
    assert tq_compress._COMPRESS.fn is tq_compress._tq_compress_kernel
