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
    assert call[9] == y.data_ptr() and call[10:] == (10, 0.5, 16, True)  # signature order, defaults filled


def test_reused_launch_can_pass_the_tensors(fast, monkeypatch):
    """POINTERS_AS_INTS off: the launcher receives the tensors themselves (Triton reads their addresses)."""
    monkeypatch.setattr(launch, "POINTERS_AS_INTS", False)
    fn = _Fn()
    run = launch.Launcher(fn)
    x, y = torch.zeros(64), torch.ones(64)
    run((1, 1, 1), (x, 10, 0.5), dict(BLOCK=16))
    run((1, 1, 1), (y, 10, 0.5), dict(BLOCK=16))
    assert fn.kernels[0].calls[0][9] is y


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
    assert fn.kernels[1].calls[0][9] == x.data_ptr() + 4


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


# ---------------------------------------------------------------------------------------------------------------
# tq_attention's call plans: a call replayed from the plan of an earlier one launches exactly what planning it
# afresh launches (kernels stubbed: the test compares grids and arguments, addresses included).


class _Recorder:
    """Stands for a compiled kernel: records what its launcher receives (grid, stream, ..., arguments)."""

    function, packed_metadata = "fn", "meta"

    def __init__(self, log, name):
        self.log, self.name = log, name

    def run(self, *args):
        self.log.append((self.name, args))


class _JitStub:
    def __init__(self, jit, log):
        fn = getattr(jit, "fn", jit)  # the Python function (also under the interpreter)
        self.names = list(inspect.signature(fn).parameters)
        self.params = [_Param(n, p.default) for n, p in inspect.signature(fn).parameters.items()]
        self.jit, self.log = fn, log

    def __getitem__(self, grid):
        def bind(*args, **kwargs):  # Triton's own path: launch and return the compiled kernel
            args = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args]
            self.log.append((self.jit.__name__, (*grid, 0, "fn", "meta", None, None, None, *args)))
            return _Recorder(self.log, self.jit.__name__)

        return bind


@pytest.fixture
def planned(fast, monkeypatch):
    import turboquant_vllm.kernels.tq_attention as tqa

    log = []
    monkeypatch.setattr(launch, "_raw_stream", lambda device: 0)
    monkeypatch.setattr(tqa, "fast_launch_enabled", lambda: True)
    monkeypatch.setattr(tqa, "interpreting", lambda: False)
    monkeypatch.setattr(tqa, "use_triton", lambda *t: True)
    monkeypatch.setattr(tqa, "_num_sms", lambda i: 132)
    monkeypatch.setattr(tqa, "_pdl_on", lambda dev: True)
    monkeypatch.setattr(tqa, "_PLANS", {})
    kernels = {"_QROT": tqa._tq_qrot_kernel, "_ATTN": tqa._tq_attn_kernel, "_REDUCE": tqa._tq_reduce_kernel}
    for name, jit in kernels.items():
        monkeypatch.setattr(tqa, name, launch.Launcher(_JitStub(jit, log)))
    return tqa, log


def _layer(b, hkv, n, d, seed):
    from turboquant_vllm.layout import Codecs, CompressedKV, KVLayout

    g = torch.Generator().manual_seed(seed)
    codecs = Codecs.build(KVLayout(d, 4, 4))  # every layer its own (as in the cache), with the same values
    kp = torch.randint(0, 255, (b, hkv, n + 8, d // 2), dtype=torch.uint8, generator=g)
    norms = torch.rand(b, hkv, n + 8, 2, generator=g).to(torch.bfloat16)
    mean = torch.randn(b, hkv, d, generator=g)
    return CompressedKV(k_packed=kp, k_norms=norms[..., 0], v_packed=kp.clone(), v_norms=norms[..., 1], k_mean=mean,
                        v_mean=mean.clone(), length=n, codecs=codecs)  # fmt: skip


@pytest.mark.parametrize("exact, mask, with_out", [(3, None, False), (0, None, True), (2, "bool", False),
                                                    (1, "add", True)])  # fmt: skip
def test_replayed_call_launches_what_a_fresh_plan_launches(planned, exact, mask, with_out):
    tqa, log = planned
    b, hkv, hq, n, d = 2, 2, 8, 40, 64

    def inputs(seed):
        g = torch.Generator().manual_seed(100 + seed)
        q = torch.randn(b, hq, 1, d, generator=g).to(torch.float16)
        ke = torch.randn(b, hkv, exact, d, generator=g).to(torch.float16) if exact else None
        ve = torch.randn(b, hkv, exact, d, generator=g).to(torch.float16) if exact else None
        m = None
        if mask == "bool":
            m = torch.rand(b, 1, 1, n + exact, generator=g) > 0.2
        elif mask == "add":
            m = torch.randn(b, 1, 1, n + exact, generator=g)
        out = torch.empty(b, 1, hq, d, dtype=torch.float16) if with_out else None
        return q, _layer(b, hkv, n, d, seed), ke, ve, m, out

    names = {j.__name__: list(inspect.signature(getattr(j, "fn", j)).parameters)
             for j in (tqa._tq_qrot_kernel, tqa._tq_attn_kernel, tqa._tq_reduce_kernel)}  # fmt: skip

    def call(q, kv, ke, ve, m, out):
        log.clear()
        tqa.tq_attention(q, kv, ke, ve, attention_mask=m, out=out)
        return _relative(log, names, with_out)

    layers = [inputs(i) for i in range(3)]
    call(*layers[0])  # plans the call
    assert len(tqa._PLANS) == 1
    for layer in layers[1:]:
        replayed = call(*layer)
        assert len(tqa._PLANS) == 1  # another layer's Codecs, the same values: the same plan
        rot = layer[1].codecs.rotation.data_ptr()
        assert rot in next(a for n, a in log if n == "_tq_qrot_kernel")  # this layer's rotation
        tqa.PLAN_REUSE = False
        try:
            fresh = call(*layer)
        finally:
            tqa.PLAN_REUSE = True
        assert [r[0] for r in replayed] == ["_tq_qrot_kernel", "_tq_attn_kernel", "_tq_reduce_kernel"]
        assert replayed == fresh


def _relative(log, names, with_out):
    """The launches' arguments (the stream aside) with the addresses of what each call allocates (the workspace
    and its views; the output unless the caller passed one) taken relative to the workspace."""
    ws = next(dict(zip(names[n], a[9:], strict=False))["ws_ptr"] for n, a in log if n == "_tq_attn_kernel")
    out = []
    for name, args in log:
        fixed = list(args[:3] + args[4:9])
        for pname, a in zip(names[name], args[9:], strict=False):
            if pname in ("ws_ptr", "qr_ptr", "qm_ptr") or (pname == "o_ptr" and not with_out):
                a = ("ws+", a - ws) if pname != "o_ptr" else "fresh output"
            fixed.append(a)
        out.append((name, tuple(fixed)))
    return out


def test_plans_are_per_length_and_never_from_aliased_tensors(planned):
    tqa, log = planned
    b, hkv, hq, d = 1, 2, 4, 64
    q = torch.randn(b, hq, 1, d).to(torch.float16)
    ke = torch.randn(b, hkv, 2, d).to(torch.float16)
    tqa.tq_attention(q, _layer(b, hkv, 40, d, 0), ke, ke)  # keys and values one tensor: no plan from this call
    assert len(tqa._PLANS) == 0
    tqa.tq_attention(q, _layer(b, hkv, 40, d, 1), ke, ke.clone())
    tqa.tq_attention(q, _layer(b, hkv, 41, d, 2), ke, ke.clone())  # another length (the next decode step)
    assert len(tqa._PLANS) == 2
    log.clear()
    ve = ke.clone()
    kv = _layer(b, hkv, 41, d, 3)
    tqa.tq_attention(q, kv, ke, ve)  # replayed: the value pointer is the value tensor's
    attn = next(a for n, a in log if n == "_tq_attn_kernel")
    assert ve.data_ptr() in attn and kv.v_packed.data_ptr() in attn and kv.k_packed.data_ptr() in attn


@pytest.mark.parametrize(
    "bits, pair, device_offset", [((4, 4), True, False), ((4, 3), True, True), ((2, 2), False, False)]
)
def test_replayed_compress_launches_what_a_fresh_plan_launches(fast, monkeypatch, bits, pair, device_offset):
    import turboquant_vllm.kernels.tq_compress as tqc
    from turboquant_vllm.layout import Codecs, KVLayout

    log = []
    monkeypatch.setattr(launch, "_raw_stream", lambda device: 0)
    monkeypatch.setattr(tqc, "fast_launch_enabled", lambda: True)
    monkeypatch.setattr(tqc, "interpreting", lambda: False)
    monkeypatch.setattr(tqc, "use_triton", lambda *t: True)
    monkeypatch.setattr(tqc, "_PLANS", {})
    monkeypatch.setattr(tqc, "_COMPRESS", launch.Launcher(_JitStub(tqc._tq_compress_kernel, log)))
    b, h, s, d = 2, 2, 3, 64

    def layer(seed):
        g = torch.Generator().manual_seed(seed)
        c = Codecs.build(KVLayout(d, *bits))
        k, v = (torch.randn(b, h, s, d, generator=g).to(torch.float16) for _ in range(2))
        km, vm = torch.randn(b, h, d, generator=g), torch.randn(b, h, d, generator=g)
        kp, vp = (torch.zeros(b, h, 16, d * nb // 8, dtype=torch.uint8) for nb in bits)
        norms = torch.zeros(b, h, 16, 2, dtype=torch.bfloat16)
        offset = torch.full((b,), 5, dtype=torch.int32) if device_offset else 5
        return k, v, km, vm, c, kp, vp, norms, offset

    def call(k, v, km, vm, c, kp, vp, norms, offset):
        log.clear()
        if pair:
            tqc.compress_kv_unchecked(k, v, km, vm, c.rotation, c.k_boundaries, c.v_boundaries, *bits, kp,
                                      norms[..., 0], vp, norms[..., 1], offset)  # fmt: skip
        else:
            tqc.tq_compress(k, km, c.rotation, c.k_boundaries, bits[0], kp, norms[..., 0], offset)
        return [(n, a[:3] + a[4:]) for n, a in log]

    layers = [layer(i) for i in range(3)]
    call(*layers[0])
    assert len(tqc._PLANS) == 1
    for one in layers[1:]:
        replayed = call(*one)
        monkeypatch.setattr(tqc, "PLAN_REUSE", False)
        fresh = call(*one)
        monkeypatch.setattr(tqc, "PLAN_REUSE", True)
        assert [n for n, _ in replayed] == ["_tq_compress_kernel"]
        assert replayed == fresh
        assert one[0].data_ptr() in replayed[0][1] and one[5].data_ptr() in replayed[0][1]
