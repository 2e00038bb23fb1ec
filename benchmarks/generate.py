"""End-to-end decode tokens/s and memory: exact KV cache vs TurboQuant TQ4, fused and unfused.

    python benchmarks/generate.py [--quick | --smoke] [--cases PATTERNS] [--json PATH] [--out-dir DIR]
    turboquant-vllm bench generate [same options]

Model: Llama-3.1-8B-shaped (hidden 4096, 32 q / 8 kv heads, head_dim 128, intermediate 14336, vocab 128256,
rope theta 5e5; no llama3 rope scaling, irrelevant to speed), random bf16 weights built from the config directly
on the GPU (no download).

Variants, per (batch B, context C) case:
  exact       DynamicCache, attention "sdpa". SDPA is pinned to its flash (else memory-efficient) backend in
              the timed region: with GQA, cuDNN re-plans whenever the KV length changes (~40 ms a call on H100).
              DynamicCache concatenates (copies) each layer's whole K/V at every step: that is part of this
              baseline, as transformers users run it.
  fused       TurboQuantCache(bits=4) + install_fused_tq4_kv: attention reads the compressed cache directly.
  unfused     the same compressed cache, attention "sdpa": every step dequantizes the whole past (PyTorch).
  fused_full  fused with every layer of the model, run when the case had to cut layers (see below).

Prefill is synthetic (a real 16 x 32K prefill is too slow): each layer's cache receives random K/V of the
context length through `cache.update(k, v, layer_idx)` (TurboQuantCache compresses them with the compress
kernel, in chunks; its capacity is reserved for the decode steps first). Then W warm-up and N timed decode
steps of `model(next_token, position_ids=..., attention_mask=None)` (greedy argmax on the GPU, no host sync
inside the loop, synchronize around it): tokens/s = B * N / seconds.
KV GiB: bytes held by the cache after the fill (`vram_bytes()` for ours, the layer tensors for exact);
kv_x: exact / this, per layer. peak GiB: torch.cuda.max_memory_allocated of the case, weights included.

Layers: 32 layers with 16 x 32K exact KV need 64 GiB of KV + 15 GiB of weights. Where a case does not fit
(estimated from free memory; an OOM retries the case with fewer), EVERY variant of that case runs with the
same smaller layer count: the column "layers" says so.

Max batch: the full model at the max-batch context (32K): the largest batch whose cache, allocated but not
computed (torch.empty for exact; a 1-token update then `reserve()` for compressed layers) plus one real
decode step fit in GPU memory, exact vs fused TQ4. Binary search; torch.OutOfMemoryError is caught.

Correctness, before timing: one decode step (B=2, 1K context) with the same compressed cache, fused vs
unfused: the logits of the model cut to --check-layers layers (default 1) and layer 0's attention output must
agree (rel err < 2e-2 each). In bf16 the two paths round differently (~4e-3 per attention output) and that
compounds over depth (~2e-2 in the logits of 32 random-weight layers), so the full model's logits are reported
but not judged. The exact cache's numbers are shown for scale (random K/V: informative only).

--smoke: CPU, a tiny 2-layer model, small contexts, every path end to end (the fused one through the Triton
interpreter if TRITON_INTERPRET=1 was set before triton was imported, else through the PyTorch path); the
max-batch search runs against a byte budget instead of GPU memory.
--cases: comma-separated; a plain word selects the cases having it as a ':'-separated part of their id
(ids: check, exact:b16:32k, fused:b1:8k, unfused:..., fused_full:..., maxbatch:exact, maxbatch:fused), a pattern
with ':' or a wildcard is matched against the whole id (fnmatch). Example: --cases check,b16 or 'fused*:b16:*'.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import gc
import inspect
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    GiB,
    Progress,
    add_plot_arguments,
    copy_bandwidth,
    default_out_dir,
    env_header,
    fmt,
    plot_only,
    print_table,
    save_figure,
    write_json,
    write_results,
)

LLAMA_31_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    tie_word_embeddings=False,
)
TINY = dict(
    vocab_size=512,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=4096,
    rope_theta=500000.0,
    tie_word_embeddings=False,
)
TARGET_SPEEDUP = 1.3  # fused TQ4 tokens/s over exact at the largest batch and context
TARGET_KV = 3.5  # exact / fused KV bytes
TARGET_BATCH = 3.5  # max batch, fused / exact
CHECK_TOL = 2e-2
VARIANTS = ("exact", "exact_prealloc", "fused", "unfused")
LAYER_CHOICES = (32, 24, 16, 12, 8, 4, 2, 1)


# ----------------------------------------------------------------------------------------------------- helpers
def _preallocated_layer(capacity: int):
    """An exact DynamicLayer whose K/V live in a buffer reserved up front: update() writes in place and
    returns views, so a decode step reads the cache once and copies nothing (DynamicLayer's torch.cat copies
    the whole layer every step). The fastest exact baseline, with the same allocation policy as ours."""
    from transformers.cache_utils import DynamicLayer

    class _Layer(DynamicLayer):
        def lazy_initialization(self, key_states, value_states):
            super().lazy_initialization(key_states, value_states)
            b, h, _, d = key_states.shape
            self.kbuf = torch.empty(b, h, capacity, d, dtype=key_states.dtype, device=key_states.device)
            self.vbuf = torch.empty_like(self.kbuf)
            self.n = 0

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            s = key_states.shape[-2]
            self.kbuf[:, :, self.n : self.n + s] = key_states
            self.vbuf[:, :, self.n : self.n + s] = value_states
            self.n += s
            self.keys, self.values = self.kbuf[:, :, : self.n], self.vbuf[:, :, : self.n]
            return self.keys, self.values

        def get_seq_length(self):
            return self.n if self.is_initialized else 0

    return _Layer()


@contextlib.contextmanager
def _eager_mask_rule():
    """While capturing decode steps: let transformers skip the causal mask when there is no padding mask, as it
    does in eager decode. transformers < 5.24 treats CUDA stream capture as tracing even without a padding mask
    (`is_tracing(None)` is True while capturing) and builds a full [B, 1, 1, N] mask; 5.24 skips it (tracing is
    only asked of a padding mask). Measured on the H100 with 5.17: that mask doubled the fused kernel (0.46 ->
    0.97 ms at B = 16 x 32K) and keeps SDPA off flash (and off GQA: repeat_kv copies K/V). Applies 5.24's rule."""
    try:
        from transformers import masking_utils
    except ImportError:  # pragma: no cover
        yield
        return
    original = getattr(masking_utils, "is_tracing", None)
    if original is None:
        yield
        return
    masking_utils.is_tracing = lambda tensor=None: tensor is not None and original(tensor)
    try:
        yield
    finally:
        masking_utils.is_tracing = original


def _is_oom(e: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    if isinstance(e, oom):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in msg.lower() or "CUBLAS_STATUS_ALLOC_FAILED" in msg)


def _err(e: BaseException) -> str:
    s = f"{type(e).__name__}: {e}".replace("\n", " ")
    return s[:300]


def _ctx_label(c: int) -> str:
    return f"{c // 1024}k" if c % 1024 == 0 else str(c)


def _parse_ints(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if part:
            out.append(int(float(part[:-1]) * 1024) if part.endswith("k") else int(part))
    return out


def selected(case_id: str, patterns: list[str] | None) -> bool:
    """A plain word matches a ':'-part of the id; a pattern with ':' or a wildcard is fnmatched on the id."""
    if not patterns:
        return True
    parts = case_id.split(":")
    for p in patterns:
        if any(ch in p for ch in "*?[:"):
            if fnmatch.fnmatchcase(case_id, p):
                return True
        elif p in parts:
            return True
    return False


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------------------------------- bench
class GenerateBench:
    """Holds the model and the settings; each public method returns result rows (dicts)."""

    def __init__(self, args, progress: Progress):
        from turboquant_vllm.layout import KVLayout

        self.args = args
        self.progress = progress
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.dtype = getattr(torch, args.dtype)
        self.spec = dict(TINY if args.smoke else LLAMA_31_8B)
        if args.model_layers:
            self.spec["num_hidden_layers"] = args.model_layers
        self.n_layers = self.spec["num_hidden_layers"]
        self.hkv = self.spec["num_key_value_heads"]
        self.d = self.spec["head_dim"]
        self.elt = torch.empty(0, dtype=self.dtype).element_size()
        self.tq_bytes = KVLayout(self.d, 4, 4).bytes_per_token_per_head
        self.steps, self.warmup = args.steps, args.warmup
        self.fill_chunk_elems = (1 << 13) if args.smoke else (1 << 25)
        self.act_base = 0 if args.smoke else GiB
        self.smoke_budget: int | None = None  # smoke on CPU: a byte budget that makes the largest case cut layers
        self.t_start = time.perf_counter()
        self.sdpa_backends: list | None = None
        self.sdpa_name = "default"
        self.sdpa_gqa = "unknown"
        self.model = None
        self.weights_bytes = 0

    # ------------------------------------------------------------------ setup
    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def over_budget(self) -> bool:
        return self.args.time_budget is not None and self.elapsed() > self.args.time_budget

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def free(self) -> None:
        if self.cuda:  # (compressed caches hold a reference cycle: gc frees them)
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / GiB if self.cuda else None

    def build_model(self) -> None:
        from transformers import LlamaConfig, LlamaForCausalLM

        from turboquant_vllm.integrations.transformers import uninstall_fused_tq4_kv

        torch.manual_seed(self.args.seed)
        cfg = LlamaConfig(**self.spec)
        cfg._attn_implementation = "sdpa"
        prev = torch.get_default_dtype()
        try:  # built directly on the device in the target dtype: no fp32 copy, no host round trip
            torch.set_default_dtype(self.dtype)
            with torch.device(self.device):
                model = LlamaForCausalLM(cfg)
        finally:
            torch.set_default_dtype(prev)
        if any(p.dtype != self.dtype for p in model.parameters()):  # default dtype not honoured: cast
            model = model.to(self.dtype)
        model.eval().requires_grad_(False)
        uninstall_fused_tq4_kv(model)  # attention "sdpa"
        self.model = model
        self.weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        fwd = inspect.signature(model.forward).parameters
        self.pass_cache_position = "cache_position" in fwd

    def pick_sdpa_backends(self) -> None:
        """The SDPA backends for the timed region: flash, else memory-efficient (cuDNN left out, see docstring)."""
        if not self.cuda:
            self.sdpa_backends, self.sdpa_name = None, "default"
            self.sdpa_gqa = self._transformers_gqa(torch.zeros(1, self.hkv, 2, self.d, dtype=self.dtype))
            return
        from torch.nn.attention import SDPBackend, sdpa_kernel

        hq = self.spec["num_attention_heads"]
        q = torch.randn(2, hq, 1, self.d, device=self.device, dtype=self.dtype)
        k = torch.randn(2, self.hkv, 300, self.d, device=self.device, dtype=self.dtype)
        ok = []
        for be in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            try:
                with sdpa_kernel([be]):
                    torch.nn.functional.scaled_dot_product_attention(q, k, k, enable_gqa=True)
                    torch.nn.functional.scaled_dot_product_attention(
                        q, k.repeat_interleave(hq // self.hkv, 1), k.repeat_interleave(hq // self.hkv, 1)
                    )
                self.sync()
                ok.append(be)
            except RuntimeError as e:
                self.progress.write(f"SDPA backend {be.name} unavailable here: {_err(e)[:160]}")
        self.sdpa_backends = ok or None
        self.sdpa_name = ok[0].name.lower().replace("_attention", "") if ok else "default(cudnn?)"
        self.sdpa_gqa = self._transformers_gqa(k)

    @staticmethod
    def _transformers_gqa(k: torch.Tensor) -> str:
        """How transformers' "sdpa" attention will treat GQA at decode (no mask): enable_gqa or repeat_kv."""
        try:
            from transformers.integrations import sdpa_attention as sa

            fn = getattr(sa, "use_gqa_in_sdpa", None)
            if fn is None:
                return "unknown"
            gqa = fn(None, k, k) if len(inspect.signature(fn).parameters) >= 3 else fn(None, k)
            return "enable_gqa" if gqa else "repeat_kv (K/V repeated every step: a slow baseline)"
        except Exception as e:
            return f"unknown ({type(e).__name__})"

    def sdpa_context(self):
        if not self.sdpa_backends:
            return contextlib.nullcontext()
        from torch.nn.attention import sdpa_kernel

        try:
            return sdpa_kernel(self.sdpa_backends, set_priority=True)
        except TypeError:  # older torch: no set_priority
            return sdpa_kernel(self.sdpa_backends)

    @contextlib.contextmanager
    def layers(self, n: int):
        """Run the model (and size new caches) with its first n decoder layers only."""
        model = self.model
        inner = model.model
        full = inner.layers
        configs = list({id(c): c for c in (model.config, inner.config)}.values())
        saved = [(c, c.num_hidden_layers, getattr(c, "layer_types", None)) for c in configs]
        if n < len(full):
            inner.layers = torch.nn.ModuleList(list(full)[:n])
            for c, _, types in saved:
                c.num_hidden_layers = n
                if types is not None:
                    c.layer_types = list(types)[:n]
        try:
            yield model.config
        finally:
            inner.layers = full
            for c, num, types in saved:
                c.num_hidden_layers = num
                if types is not None:
                    c.layer_types = types

    # ------------------------------------------------------------------ memory estimates
    def budget_bytes(self) -> int | None:
        """Bytes a case may add to what is allocated now (None: unlimited, CPU)."""
        if not self.cuda:
            return self.smoke_budget
        self.free()
        free, total = torch.cuda.mem_get_info(self.device)
        return int(free - max(2 * GiB, 0.04 * total))

    def estimate(self, variant: str, b: int, c: int, n_layers: int) -> int:
        t = c + self.decode_tokens()
        act = self.act_base + b * self.spec["vocab_size"] * 8
        exact_layer = b * self.hkv * t * self.d * self.elt * 2
        tq_layer = b * self.hkv * t * self.tq_bytes
        if variant == "exact":
            return (n_layers + 1) * exact_layer + act  # + one layer: the random K/V of the fill, the cat of a step
        if variant == "exact_prealloc":
            return n_layers * exact_layer + exact_layer // 2 + act
        if variant == "unfused":  # the dequantized past of one layer: int32/int64 indices, float32 temporaries
            return n_layers * tq_layer + b * self.hkv * t * self.d * 32 + act
        return n_layers * tq_layer + act

    def choose_layers(self, variants: list[str], b: int, c: int) -> tuple[int, list[int]]:
        """Largest layer count (of LAYER_CHOICES, <= the model's) at which every variant is estimated to fit."""
        choices = sorted({n for n in LAYER_CHOICES if n < self.n_layers} | {self.n_layers}, reverse=True)
        if self.args.layers:
            return min(self.args.layers, self.n_layers), []
        budget = self.budget_bytes()
        if budget is None:
            return self.n_layers, []
        for i, n in enumerate(choices):
            if all(self.estimate(v, b, c, n) <= budget for v in variants):
                return n, choices[i + 1 :]
        return choices[-1], []

    # ------------------------------------------------------------------ caches
    def _gen(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def _randn(self, shape, g) -> torch.Tensor:
        return torch.randn(*shape, device=self.device, dtype=self.dtype, generator=g)

    def fill(self, caches: list, n_layers: int, b: int, c: int, seed: int) -> None:
        """Give every cache the same random K/V of c tokens per layer (compressed caches: in chunks)."""
        from turboquant_vllm.cache.layer import CompressedLayer

        g = self._gen(seed)
        compressed = [x for x in caches if hasattr(x, "fused_mode")]
        modes = [x.fused_mode for x in compressed]
        for x in compressed:  # fused mode: update() returns no dequantized past while filling
            x.fused_mode = True
        # exact caches alone: one update per layer (DynamicLayer concatenates: chunks would copy quadratically)
        chunk = c if not compressed else max(1, min(c, self.fill_chunk_elems // (b * self.hkv * self.d)))
        reserve = c + self.decode_tokens()
        try:
            for i in range(n_layers):
                for s in range(0, c, chunk):
                    n = min(chunk, c - s)
                    k = self._randn((b, self.hkv, n, self.d), g)
                    v = self._randn((b, self.hkv, n, self.d), g)
                    for cache in caches:
                        layer = cache.layers[i]
                        if s == 0 and isinstance(layer, CompressedLayer):
                            layer.lazy_initialization(k, v)
                            layer.reserve(reserve)  # exactly the tokens to come: no regrowth, no slack
                        cache.update(k, v, i)
                    del k, v
        finally:
            for x, m in zip(compressed, modes, strict=True):
                x.fused_mode = m

    @staticmethod
    def kv_bytes(cache) -> int:
        if hasattr(cache, "vram_bytes"):
            return int(cache.vram_bytes())
        total = 0
        for layer in cache.layers:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total

    # ------------------------------------------------------------------ decode
    def decode(self, cache, tok: torch.Tensor, pos: int, n: int, keep_logits: bool = False):
        from turboquant_vllm.integrations.transformers import cache_kwargs

        kw = cache_kwargs(self.model, cache)
        b = tok.shape[0]
        logits = None
        for i in range(n):
            p = pos + i
            extra = {}
            if self.pass_cache_position:
                extra["cache_position"] = torch.full((1,), p, dtype=torch.long, device=self.device)
            pid = torch.full((b, 1), p, dtype=torch.long, device=self.device)
            out = self.model(input_ids=tok, position_ids=pid, attention_mask=None, use_cache=True, **kw, **extra)
            last = out.logits[:, -1]
            if keep_logits:
                logits = last.float()
            tok = last.argmax(-1, keepdim=True)
            del out, last
        return tok, logits

    def first_token(self, b: int, seed: int) -> torch.Tensor:
        g = self._gen(seed + 1)
        return torch.randint(3, self.spec["vocab_size"], (b, 1), device=self.device, generator=g)

    def attn_name(self, variant: str) -> str:
        if variant in ("fused", "fused_full"):
            from turboquant_vllm.kernels._common import use_triton

            probe = torch.empty(1, device=self.device)
            if use_triton(probe):
                return "tq4-triton-interp" if not self.cuda else "tq4-triton"
            return "tq4-pytorch"
        return f"sdpa-{self.sdpa_name}"

    # ------------------------------------------------------------------ one timed variant
    def run_variant(self, variant: str, b: int, c: int, n_layers: int) -> dict:
        from transformers import DynamicCache

        from turboquant_vllm import TurboQuantCache
        from turboquant_vllm.integrations.transformers import install_fused_tq4_kv, uninstall_fused_tq4_kv

        row = dict(case=f"{variant}:b{b}:{_ctx_label(c)}", variant=variant, B=b, ctx=c, layers=n_layers,
                   steps=self.steps, attn=self.attn_name(variant))  # fmt: skip
        self.free()
        cache = None
        try:
            with self.layers(n_layers) as cfg:
                t0 = time.perf_counter()
                if variant == "exact":
                    cache = DynamicCache(config=cfg)
                elif variant == "exact_prealloc":
                    cache = DynamicCache(config=cfg)
                    cap = c + self.decode_tokens()
                    cache.layers = [_preallocated_layer(cap) for _ in cache.layers]
                else:
                    cache = TurboQuantCache(cfg, bits=4)
                self.fill([cache], n_layers, b, c, seed=self.args.seed)
                self.sync()
                row["fill_s"] = time.perf_counter() - t0
                row["kv_bytes"] = self.kv_bytes(cache)
                row["kv_GiB"] = row["kv_bytes"] / GiB
                if variant in ("fused", "fused_full"):
                    install_fused_tq4_kv(self.model, cache)
                    ctx = contextlib.nullcontext()
                else:
                    uninstall_fused_tq4_kv(self.model)
                    ctx = self.sdpa_context()
                try:
                    with ctx:
                        tok = self.first_token(b, self.args.seed)
                        t0 = time.perf_counter()
                        tok, _ = self.decode(cache, tok, c, self.warmup)
                        self.sync()
                        row["warmup_s"] = time.perf_counter() - t0
                        t0 = time.perf_counter()
                        tok, _ = self.decode(cache, tok, c + self.warmup, self.steps)
                        self.sync()
                        dt = time.perf_counter() - t0
                        extra = self.profile_steps(row["case"], cache, tok, c + self.warmup + self.steps)
                        if variant in ("exact_prealloc", "fused", "fused_full") and self.graph_steps_n():
                            done = self.graph_steps(row, cache, tok, c + self.warmup + self.steps + extra, variant)
                            extra = None if done is None else extra + done
                finally:
                    uninstall_fused_tq4_kv(self.model)
                seq = cache.get_seq_length()
                if extra is not None and seq != c + self.warmup + self.steps + extra:
                    raise RuntimeError(
                        f"cache holds {seq} tokens after decoding, expected {c + self.warmup + self.steps + extra}"
                    )
                row["tok_s"] = b * self.steps / dt
                row["ms_step"] = 1e3 * dt / self.steps
                row["peak_GiB"] = self.peak_gib()
        except Exception as e:
            row["error"] = _err(e)
            row["oom"] = _is_oom(e)
            self.progress.write(f"[{row['case']}] FAILED: {row['error']}")
            if not row["oom"]:
                self.progress.write(traceback.format_exc(limit=-6))
        finally:
            del cache
            self.free()
        return row

    def decode_tokens(self) -> int:
        """Tokens a case appends after its context: warm-up, timed, profiled (twice --profile), graph steps, + 1."""
        return self.warmup + self.steps + 2 * (self.args.profile or 0) + self.graph_steps_n() + 1

    def graph_steps_n(self) -> int:
        """Decode steps replayed from CUDA graphs after the eager ones (--graphs on CUDA), else 0."""
        return self.steps if getattr(self.args, "graphs", False) and self.device.type == "cuda" else 0

    def graph_steps(self, row: dict, cache, tok: torch.Tensor, pos: int, variant: str) -> int | None:
        """--graphs: capture the next `steps` decode steps as one CUDA graph each (the lengths of each step are
        baked into its graph, the token flows from one graph to the next; one memory pool), then replay them
        in order and time the replays: the GPU's cost of a decode step without the host's. Same for every
        variant; the exact cache's SDPA may pick any of cuDNN / flash / memory-efficient inside a graph (a
        graph has no per-step re-planning to fear), and transformers skips the causal mask as in eager decode
        (`_eager_mask_rule`; without it, transformers 5.17 built a full mask under capture: flash was refused,
        "No available kernel", and the fused kernel read the mask). Sets row["graph_tok_s"], row["graph_ms_step"]
        (or row["graph_error"]). Returns the steps, or None where a capture failed part-way (the cache's length
        is then unknown)."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        from turboquant_vllm.integrations.transformers import cache_kwargs

        n, b = self.graph_steps_n(), tok.shape[0]
        kw = cache_kwargs(self.model, cache)
        ids = [torch.full((b, 1), pos + i, dtype=torch.long, device=self.device) for i in range(n)]
        cps = [torch.full((1,), pos + i, dtype=torch.long, device=self.device) for i in range(n)]
        graphs, keep, pool, cur = [], [], None, tok.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
        sdpa = contextlib.nullcontext() if variant.startswith("fused") else sdpa_kernel(backends)
        try:
            with torch.cuda.stream(stream), sdpa, _eager_mask_rule():
                for i in range(n):
                    extra = {"cache_position": cps[i]} if self.pass_cache_position else {}
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g, pool=pool, stream=stream):
                        out = self.model(input_ids=cur, position_ids=ids[i], attention_mask=None, use_cache=True,
                                         **kw, **extra)  # fmt: skip
                        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                    pool = g.pool()
                    graphs.append(g)
                    keep.append((cur, out))
                    cur = nxt
            torch.cuda.current_stream().wait_stream(stream)
            self.sync()
            t0 = time.perf_counter()
            for g in graphs:
                g.replay()
            self.sync()
            dt = time.perf_counter() - t0
            row["graph_tok_s"] = b * n / dt
            row["graph_ms_step"] = 1e3 * dt / n
            self.progress.write(f"[{row['case']}] CUDA graphs: {row['graph_tok_s']:.1f} tok/s "
                                f"({row['graph_ms_step']:.2f} ms/step, {n} steps)")  # fmt: skip
        except Exception as e:  # a capture that fails (a host sync in the step) is reported, not fatal
            torch.cuda.current_stream().wait_stream(stream)
            row["graph_error"] = _err(e)
            self.progress.write(f"[{row['case']}] CUDA-graph capture failed: {row['graph_error']}")
            return None
        finally:
            del graphs, keep
        return n

    def profile_steps(self, case: str, cache, tok: torch.Tensor, pos: int) -> int:
        """--profile N: N more decode steps (after the timed ones) under torch.profiler, then N under cProfile.
        Writes the operators by self CPU time and by device time, then the Python functions by own time, to
        <out-dir>/profile_<case>.txt and prints where the step's wall time goes (GPU busy = the kernels' device
        time, which the host-side time per step exceeds when the step is bound by the host). Returns 2 N."""
        n = self.args.profile or 0
        if not n:
            return 0
        import cProfile
        import io
        import pstats

        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self.sync()
        t0 = time.perf_counter()
        with profile(activities=acts) as prof:
            tok, _ = self.decode(cache, tok, pos, n)
            self.sync()
        wall = (time.perf_counter() - t0) / n
        ka = prof.key_averages()
        # kernels only (an ATen op's self device time repeats its kernels')
        dev_us = sum(e.self_device_time_total for e in ka if str(getattr(e, "device_type", "")).endswith("CUDA")) / n
        cpu = ka.table(sort_by="self_cpu_time_total", row_limit=30)
        dev = ka.table(sort_by="self_device_time_total", row_limit=30) if len(acts) > 1 else ""
        self.sync()
        t0 = time.perf_counter()
        with cProfile.Profile() as py:
            self.decode(cache, tok, pos + n, n)
            self.sync()
        py_wall = (time.perf_counter() - t0) / n
        buf = io.StringIO()
        pstats.Stats(py, stream=buf).sort_stats("tottime").print_stats(40)
        path = Path(self.args.out_dir) / f"profile_{case.replace(':', '_')}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            f"{case}: {n} decode steps under the profiler\n\nby self CPU time\n{cpu}\n\nby device time\n{dev}\n\n"
            f"{n} decode steps under cProfile ({1e3 * py_wall:.2f} ms per step), by own time\n{buf.getvalue()}\n"
        )
        self.progress.write(
            f"[{case}] profile: {1e3 * wall:.2f} ms per step under the profiler, GPU kernels busy "
            f"{dev_us / 1e3:.2f} ms per step ({path})"
        )
        return 2 * n

    def run_case(self, b: int, c: int, variants: list[str]) -> list[dict]:
        """Every selected variant of one (B, context) case, at one layer count that fits all of them."""
        n_layers, smaller = self.choose_layers(variants, b, c)
        while True:
            if n_layers < self.n_layers:
                self.progress.write(f"B={b} ctx={c}: {n_layers} of {self.n_layers} layers (all do not fit)")
            rows = []
            for v in variants:
                if self.over_budget():
                    rows.append(dict(case=f"{v}:b{b}:{_ctx_label(c)}", variant=v, B=b, ctx=c, layers=n_layers,
                                     error="skipped: time budget"))  # fmt: skip
                    continue
                rows.append(self.run_variant(v, b, c, n_layers))
                self.progress.write(self.row_line(rows[-1]))
                if rows[-1].get("oom") and smaller:
                    break  # the whole case again with fewer layers
            if any(r.get("oom") for r in rows) and smaller and not self.over_budget():
                n_layers = smaller.pop(0)
                self.progress.write(f"B={b} ctx={c}: out of memory, again with {n_layers} layers")
                continue
            break
        return rows

    @staticmethod
    def annotate(rows: list[dict]) -> None:
        """Per (B, ctx): x_exact = tokens/s over the exact cache's (DynamicCache, else preallocated; same layer
        count only); kv_x = exact / this KV bytes, per layer."""
        for r in rows:
            same = [x for x in rows if x.get("B") == r.get("B") and x.get("ctx") == r.get("ctx") and "tok_s" in x]
            exact = next((x for v in ("exact", "exact_prealloc") for x in same if x.get("variant") == v), None)
            if exact is None:
                continue
            if "tok_s" in r and r["layers"] == exact["layers"]:
                r["x_exact"] = r["tok_s"] / exact["tok_s"]
            if r.get("kv_bytes") and exact.get("kv_bytes"):
                r["kv_x"] = (exact["kv_bytes"] / exact["layers"]) / (r["kv_bytes"] / r["layers"])

    def full_layers_row(self, b: int, c: int) -> dict | None:
        """fused with every layer, for a case that ran with fewer."""
        budget = self.budget_bytes()
        if budget is not None and self.estimate("fused", b, c, self.n_layers) > budget:
            return dict(case=f"fused_full:b{b}:{_ctx_label(c)}", variant="fused_full", B=b, ctx=c,
                        layers=self.n_layers, error="skipped: estimated not to fit")  # fmt: skip
        row = self.run_variant("fused_full", b, c, self.n_layers)
        self.progress.write(self.row_line(row))
        return row

    @staticmethod
    def row_line(r: dict) -> str:
        if "error" in r:
            return f"[{r['case']}] layers={r.get('layers')} ERROR {r['error']}"
        return (
            f"[{r['case']}] layers={r['layers']} {fmt(r.get('tok_s'))} tok/s ({fmt(r.get('ms_step'))} ms/step), "
            f"KV {fmt(r.get('kv_GiB'))} GiB, peak {fmt(r.get('peak_GiB'))} GiB, fill {fmt(r.get('fill_s'))} s, "
            f"warm-up {fmt(r.get('warmup_s'))} s, {r.get('attn')}"
        )

    # ------------------------------------------------------------------ autotune on the shape that matters
    def pretune(self, b: int, c: int) -> str:
        """Call the fused attention once at the target decode shape (B=b, c compressed tokens, one new token).

        Its autotune key holds no sizes, so the first call's shape picks the tile for every later call;
        without this the small correctness check would pick it.
        """
        from turboquant_vllm.cache.layer import CompressedLayer, TurboQuantSettings
        from turboquant_vllm.kernels.tq_attention import tq_attention

        t0 = time.perf_counter()
        g = self._gen(self.args.seed + 3)
        one = self._randn((b, self.hkv, 1, self.d), g)
        layer = CompressedLayer(self.d, TurboQuantSettings(k_bits=4, v_bits=4))
        layer.fused = True
        layer.lazy_initialization(one, one)
        layer.reserve(c + 1)
        layer.update(one, one)
        layer.num_compressed = c  # c stored tokens (codes zero but for the first): allocated, not computed
        ke, ve = layer.update(one, one)  # the decode step: attends c compressed tokens + 1 exact
        q = self._randn((b, self.spec["num_attention_heads"], 1, self.d), g)
        out = tq_attention(q, layer.attention_view(), ke, ve)
        self.sync()
        ok = bool(torch.isfinite(out).all())
        del layer, out, q, ke, ve, one
        self.free()
        return f"fused attention autotuned at B={b}, {c} tokens in {time.perf_counter() - t0:.1f} s (finite: {ok})"

    # ------------------------------------------------------------------ correctness
    def _one_step_logits(self, n_layers: int, b: int, c: int) -> dict:
        """Same random K/V in three caches; one decode step each: exact, unfused TQ4, fused TQ4.

        Returns the logits (float32 [B, V]) and layer 0's attention output (identical inputs in all three).
        """
        from transformers import DynamicCache

        from turboquant_vllm import TurboQuantCache
        from turboquant_vllm.integrations.transformers import install_fused_tq4_kv, uninstall_fused_tq4_kv

        attn0 = []

        def hook(module, inputs, output):
            attn0.append((output[0] if isinstance(output, tuple) else output).float().clone())

        handle = self.model.model.layers[0].self_attn.register_forward_hook(hook)
        try:
            with self.layers(n_layers) as cfg:
                caches = [DynamicCache(config=cfg), TurboQuantCache(cfg, bits=4), TurboQuantCache(cfg, bits=4)]
                self.fill(caches, n_layers, b, c, seed=self.args.seed + 7)
                tok = self.first_token(b, self.args.seed + 7)
                with self.sdpa_context():
                    _, exact = self.decode(caches[0], tok, c, 1, keep_logits=True)
                    _, unfused = self.decode(caches[2], tok, c, 1, keep_logits=True)
                name = install_fused_tq4_kv(self.model, caches[1])
                try:
                    _, fused = self.decode(caches[1], tok, c, 1, keep_logits=True)
                    fused_mode = caches[1].layers[0].fused and caches[1].layers[0].attend_compressed == c
                finally:
                    uninstall_fused_tq4_kv(self.model)
        finally:
            handle.remove()
        if len(attn0) != 3:
            raise RuntimeError(f"expected 3 layer-0 attention outputs, hooked {len(attn0)}")
        return dict(exact=exact, unfused=unfused, fused=fused, attn0=attn0, name=name, fused_mode=fused_mode)

    def check(self) -> dict:
        """One decode step, fused vs unfused TQ4: logits and layer 0's attention output.

        The criterion uses a model cut to --check-layers layers (default 1): in bf16 the rounding differences
        of the two paths (~4e-3 relative per attention output) compound over depth, to ~2e-2 in the logits of
        32 random-weight layers. The full model's numbers are reported too (not a criterion).
        """
        b, c = self.args.check_batch, self.args.check_ctx
        n_check = max(1, min(self.args.check_layers, self.n_layers))
        row = dict(case="check", B=b, ctx=c, layers=n_check, tol=CHECK_TOL, attn=self.attn_name("fused"))
        self.free()
        try:
            r = self._one_step_logits(n_check, b, c)
            ex, un, fu = r["exact"], r["unfused"], r["fused"]
            finite = bool(torch.isfinite(fu).all() and torch.isfinite(un).all())
            row.update(
                attn_impl=r["name"],
                fused_mode=r["fused_mode"],
                rel_err=_rel(fu, un),
                rel_err_attn0=_rel(r["attn0"][2], r["attn0"][1]),
                rel_err_fused_vs_exact=_rel(fu, ex),
                rel_err_attn0_fused_vs_exact=_rel(r["attn0"][2], r["attn0"][0]),
                top1_fused_vs_unfused=float((fu.argmax(-1) == un.argmax(-1)).float().mean()),
                finite=finite,
            )
            row["passed"] = bool(
                finite and r["fused_mode"] and row["rel_err"] < CHECK_TOL and row["rel_err_attn0"] < CHECK_TOL
            )
            del r, ex, un, fu
            self.free()
            if n_check < self.n_layers:
                r = self._one_step_logits(self.n_layers, b, c)
                row["rel_err_all_layers"] = _rel(r["fused"], r["unfused"])
                row["top1_all_layers"] = float((r["fused"].argmax(-1) == r["unfused"].argmax(-1)).float().mean())
                del r
        except Exception as e:
            row["error"] = _err(e)
            row["passed"] = False
            self.progress.write(f"[check] FAILED: {row['error']}")
            self.progress.write(traceback.format_exc(limit=-6))
        finally:
            self.free()
        self.progress.write(self.check_line(row))
        return row

    @staticmethod
    def check_line(r: dict) -> str:
        if "rel_err" not in r:
            return f"CHECK fused vs unfused TQ4, one decode step: FAILED ({r.get('error')})"
        verdict = "PASS" if r["passed"] else "FAIL"
        line = (
            f"CHECK fused vs unfused TQ4, one decode step, B={r['B']} ctx={r['ctx']}, {r['layers']} layer(s): "
            f"logits rel err {r['rel_err']:.2e}, layer-0 attention {r['rel_err_attn0']:.2e} (< {CHECK_TOL:g}) "
            f"{verdict}; top-1 {r['top1_fused_vs_unfused']:.0%}; fused vs exact cache {r['rel_err_fused_vs_exact']:.2e}"
        )
        if "rel_err_all_layers" in r:
            line += f"; all layers: {r['rel_err_all_layers']:.2e}, top-1 {r['top1_all_layers']:.0%} (info)"
        if not r["finite"]:
            line += "; NON-FINITE logits"
        if not r.get("fused_mode", True):
            line += "; the fused path was NOT taken"
        return line

    # ------------------------------------------------------------------ max batch
    def _probe(self, kind: str, b: int, c: int, budget: int | None) -> tuple[bool, dict]:
        """Allocate a cache of b x c tokens for every layer, then one real decode step. (fits, info)."""
        from transformers import DynamicCache

        from turboquant_vllm import TurboQuantCache
        from turboquant_vllm.integrations.transformers import install_fused_tq4_kv, uninstall_fused_tq4_kv

        n_layers = self.n_layers
        with self.layers(n_layers) as cfg:
            shape1 = (b, self.hkv, 1, self.d)
            if kind == "exact":
                cache = DynamicCache(config=cfg)
                for i in range(n_layers):
                    one = torch.zeros(shape1, device=self.device, dtype=self.dtype)
                    cache.update(one, one, i)  # lazy init, then the c-token storage (allocated, not computed)
                    layer = cache.layers[i]
                    layer.keys = torch.empty(b, self.hkv, c, self.d, device=self.device, dtype=self.dtype)
                    layer.values = torch.empty(b, self.hkv, c, self.d, device=self.device, dtype=self.dtype)
            else:
                cache = TurboQuantCache(cfg, bits=4)
                install_fused_tq4_kv(self.model, cache)
            try:
                if kind != "exact":
                    g = self._gen(self.args.seed)
                    for i in range(n_layers):
                        k1, v1 = self._randn(shape1, g), self._randn(shape1, g)
                        layer = cache.layers[i]
                        layer.lazy_initialization(k1, v1)
                        layer.reserve(c + 1)  # room for c tokens + the decode step
                        cache.update(k1, v1, i)  # the means, one real token
                        layer.num_compressed = c  # treat c tokens as stored (the others' codes are zeros)
                held = self.kv_bytes(cache)
                info = dict(kv_bytes=held)
                if budget is not None and held > budget:  # smoke: a byte budget stands for GPU memory
                    return False, info
                ctx = self.sdpa_context() if kind == "exact" else contextlib.nullcontext()
                with ctx:
                    self.decode(cache, self.first_token(b, self.args.seed), c, 1)
                self.sync()
                info["peak_GiB"] = self.peak_gib()
                return True, info
            finally:
                if kind != "exact":
                    uninstall_fused_tq4_kv(self.model)

    def fits(self, kind: str, b: int, c: int, budget: int | None) -> tuple[bool, dict]:
        self.free()
        try:
            return self._probe(kind, b, c, budget)
        except Exception as e:
            if _is_oom(e):
                return False, {}
            raise
        finally:
            self.free()

    def max_batch(self, kind: str) -> dict:
        c = self.args.maxbatch_ctx
        row = dict(case=f"maxbatch:{kind}", variant=kind, ctx=c, layers=self.n_layers, attn=self.attn_name(kind))
        per_batch_exact = self.n_layers * 2 * self.hkv * c * self.d * self.elt
        means = 2 * self.d * 4  # float32 k/v centring means per (batch, head)
        tq_per_batch = self.n_layers * self.hkv * ((c + 1) * self.tq_bytes + means)
        per_batch = per_batch_exact if kind == "exact" else tq_per_batch
        if self.cuda:
            budget, avail = None, self.budget_bytes()
        else:  # CPU: a byte budget of 1.2 exact caches of one sequence stands for the GPU memory
            budget = avail = int(1.2 * per_batch_exact)
        start = max(1, int(avail // per_batch))
        limit = self.args.maxbatch_limit
        probes: list[tuple[int, bool]] = []
        best: dict = {}

        def fits(b: int) -> bool:
            nonlocal best
            if self.over_budget():
                raise TimeoutError("time budget: search cut short")
            ok, info = self.fits(kind, b, c, budget)
            probes.append((b, ok))
            if ok and b >= max([0] + [p for p, good in probes[:-1] if good]):
                best = info
            return ok

        lo, hi = 0, None  # lo: largest batch known to fit, hi: smallest known not to
        try:
            b, step = min(start, limit), max(1, start // 16)
            while True:  # bracket, starting from the estimate
                if fits(b):
                    lo = b
                    if hi is not None or b >= limit:
                        break
                    b, step = min(limit, b + step), step * 2
                else:
                    hi = b
                    if lo > 0 or b == 1:
                        break
                    b, step = max(1, b - step), step * 2
            while hi is not None and hi - lo > 1:  # bisect
                mid = (lo + hi) // 2
                if fits(mid):
                    lo = mid
                else:
                    hi = mid
        except TimeoutError as e:
            row["note"] = str(e)
        except Exception as e:
            row["error"] = _err(e)
            self.progress.write(f"[{row['case']}] FAILED: {row['error']}")
            self.progress.write(traceback.format_exc(limit=-6))
        row.update(B=lo, probes=" ".join(f"{b}{'+' if ok else '-'}" for b, ok in probes), estimate=start)
        if best:
            row["kv_GiB"] = best["kv_bytes"] / GiB
            row["peak_GiB"] = best.get("peak_GiB")
        if hi is None and lo >= limit:
            row["note"] = f"hit --maxbatch-limit {limit}"
        if lo == 0 and "error" not in row:
            row["error"] = row.get("note") or "batch 1 does not fit"
        self.progress.write(
            f"[{row['case']}] {self.n_layers} layers, ctx {c}: max batch {lo} (probes {row['probes']}; "
            f"estimate {start}){' ' + row['error'] if 'error' in row else ''}"
        )
        return row


# ----------------------------------------------------------------------------------------------------- summary
def summarize(
    check_row: dict | None,
    rows: list[dict],
    mb: dict[str, dict],
    b_t: int,
    c_t: int,
    n_layers: int,
    smoke: bool = False,
) -> list[str]:
    lines = []
    tgt = "SMOKE (tiny model on CPU, not a measurement) TARGET" if smoke else "TARGET"
    if check_row is not None:
        lines.append(GenerateBench.check_line(check_row))

    def verdict(x, target):
        return "PASS" if x is not None and x >= target else "FAIL"

    case = {r.get("variant"): r for r in rows if r.get("B") == b_t and r.get("ctx") == c_t}
    ex, fu, pa = case.get("exact"), case.get("fused"), case.get("exact_prealloc")
    where = f"B={b_t}, ctx {c_t}"
    eager = [(r, label) for r, label in ((ex, "exact (DynamicCache)"), (pa, "exact preallocated (no per-step copy)"))
             if fu and r and "tok_s" in r and "tok_s" in fu]  # fmt: skip
    for base, label in eager:
        s = fu["tok_s"] / base["tok_s"]
        lines.append(
            f"{tgt} fused TQ4 / {label} tokens/s at {where} ({base['layers']} layers): {s:.2f}x "
            f"(target >= {TARGET_SPEEDUP}x) {verdict(s, TARGET_SPEEDUP)}"
        )
    if not eager:
        lines.append(f"{tgt} fused TQ4 / exact tokens/s at {where}: not measured")
    pa = case.get("exact_prealloc")
    if pa and fu and "graph_tok_s" in pa and "graph_tok_s" in fu:
        s3 = fu["graph_tok_s"] / pa["graph_tok_s"]
        lines.append(
            f"{tgt} fused TQ4 / exact preallocated, both replayed from CUDA graphs, tokens/s at {where} "
            f"({pa['layers']} layers): {s3:.2f}x (target >= {TARGET_SPEEDUP}x) {verdict(s3, TARGET_SPEEDUP)}"
        )
    ff = case.get("fused_full")
    if ff and "tok_s" in ff:
        lines.append(f"INFO fused TQ4 with all {ff['layers']} layers at {where}: {ff['tok_s']:.1f} tokens/s")
    if (ex or pa) and fu and fu.get("kv_x"):
        lines.append(
            f"{tgt} KV memory exact / fused TQ4 at {where}: {fu['kv_x']:.2f}x "
            f"(target >= {TARGET_KV}x) {verdict(fu['kv_x'], TARGET_KV)}"
        )
    else:
        lines.append(f"{tgt} KV memory exact / fused TQ4 at {where}: not measured")
    me, mf = mb.get("exact"), mb.get("fused")
    if me and mf and me.get("B") and mf.get("B"):
        r = mf["B"] / me["B"]
        lines.append(
            f"{tgt} max batch at ctx {me['ctx']}, {me['layers']} layers: exact {me['B']}, fused TQ4 {mf['B']}: "
            f"{r:.2f}x (target >= {TARGET_BATCH}x) {verdict(r, TARGET_BATCH)}"
        )
    elif me or mf:
        lines.append(f"{tgt} max batch: not measured (exact {me and me.get('B')}, fused {mf and mf.get('B')})")
    cut = sorted(
        {(r["B"], r["ctx"], r["layers"]) for r in rows if r.get("layers") and r.get("variant") != "fused_full"}
    )
    for b, c, n in cut:
        if n < n_layers:
            lines.append(f"NOTE B={b} ctx {c} ran with {n} of {n_layers} layers (exact KV does not fit with all)")
    errors = [r["case"] for r in rows + list(mb.values()) if r.get("error")]
    if errors:
        lines.append(f"ERRORS in: {', '.join(errors)} (see the error column / JSON)")
    return lines


# ----------------------------------------------------------------------------------------------------- main
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="fewer cases and steps (B=1 and 16 at 32K, 6 steps)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny 2-layer model, small contexts, every path")
    p.add_argument("--json", metavar="PATH", help="also write the results (env, rows, summary) as JSON here")
    p.add_argument(
        "--out-dir", default=None, help="where generate.json / generate.md go (default $OUT or benchmarks/out)"
    )
    p.add_argument("--cases", default=None, help="comma-separated case filter (see the module docstring)")
    p.add_argument("--batches", default=None, help="e.g. 1,16 (default 1,16; smoke 1,2)")
    p.add_argument("--contexts", default=None, help="e.g. 8k,32k (default 8k,32k; quick 32k; smoke 48)")
    p.add_argument("--steps", type=int, default=None, help="timed decode steps (default 16; quick 6; smoke 1)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up decode steps (default 3; quick 2; smoke 1)")
    p.add_argument("--layers", type=int, default=None, help="force this many layers for every case")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, N steps under torch.profiler, then N under cProfile (out dir)")  # fmt: skip
    p.add_argument("--graphs", action="store_true",
                   help="also time --steps decode steps replayed from CUDA graphs (exact_prealloc, fused)")  # fmt: skip
    p.add_argument("--model-layers", type=int, default=None, help="layers of the model built (default 32; smoke 2)")
    p.add_argument("--check-batch", type=int, default=None, help="batch of the correctness check (default 2)")
    p.add_argument("--check-ctx", type=int, default=None, help="context of the correctness check (default 1024)")
    p.add_argument("--check-layers", type=int, default=1, help="layers of the model in the check's criterion")
    p.add_argument("--maxbatch-ctx", type=int, default=None, help="context of the max-batch search (default 32768)")
    p.add_argument("--maxbatch-limit", type=int, default=None, help="largest batch probed (default 1024)")
    p.add_argument("--device", default=None, help="default: cuda (smoke: cpu)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="model and KV dtype (default bfloat16; smoke on CPU float32)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds after which remaining cases are skipped (default 330; smoke none)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    add_plot_arguments(p, "tokens/s, KV memory and the max batch")


def _defaults(args) -> None:
    smoke, quick = args.smoke, args.quick and not args.smoke
    if args.device is None:
        args.device = "cpu" if smoke or not torch.cuda.is_available() else "cuda"
    if args.dtype is None:
        args.dtype = "float32" if torch.device(args.device).type == "cpu" else "bfloat16"
    batches = "1,2" if smoke else "1,16"
    contexts = "48" if smoke else ("32k" if quick else "8k,32k")
    args.batches = _parse_ints(args.batches or batches)
    args.contexts = _parse_ints(args.contexts or contexts)
    if args.steps is None:
        args.steps = 1 if smoke else (6 if quick else 16)
    if args.warmup is None:
        args.warmup = 1 if smoke else (2 if quick else 3)
    args.check_batch = args.check_batch or 2
    args.check_ctx = args.check_ctx or (32 if smoke else 1024)
    args.maxbatch_ctx = args.maxbatch_ctx or (32 if smoke else 32768)
    args.maxbatch_limit = args.maxbatch_limit or (64 if smoke else 1024)
    if args.time_budget is None and not smoke:
        args.time_budget = 330.0
    if args.time_budget is not None and args.time_budget <= 0:
        args.time_budget = None
    args.cases = [p.strip() for p in args.cases.split(",") if p.strip()] if args.cases else None
    if args.out_dir is None:
        args.out_dir = default_out_dir()
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("--steps must be >= 1 and --warmup >= 0")


TABLE = ["case", "layers", "B", "ctx", "tok_s", "ms_step", "graph_tok_s", "graph_ms_step", "x_exact", "kv_GiB", "kv_x",
         "peak_GiB", "attn", "error"]  # fmt: skip
MB_TABLE = ["case", "layers", "ctx", "B", "kv_GiB", "peak_GiB", "probes", "attn", "error"]


def run(args) -> int:
    _defaults(args)
    if torch.device(args.device).type == "cuda":
        if not torch.cuda.is_available():
            print("benchmarks/generate.py: CUDA is not available (use --smoke for the CPU run)", flush=True)
            return 2
        if not torch.cuda.is_initialized():  # fewer fragmentation failures in the max-batch search
            os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    env = env_header(args.device)
    env.update(benchmark="generate", mode="smoke" if args.smoke else ("quick" if args.quick else "default"))
    print("== turboquant-vllm generate benchmark")
    for k, v in env.items():
        print(f"  {k}: {v}")
    if env.get("device", "").startswith("cuda"):
        try:
            env["copy_bw_TBps"] = round(copy_bandwidth(args.device) / 1e12, 3)
            print(f"  copy bandwidth (read + write, 1 GiB): {env['copy_bw_TBps']} TB/s")
        except Exception as e:  # informative only
            print(f"  copy bandwidth: failed ({_err(e)})")
    print(f"  options: batches {args.batches}, contexts {args.contexts}, steps {args.steps} (+{args.warmup} warm-up), "
          f"cases {args.cases or 'all'}, time budget {args.time_budget} s", flush=True)  # fmt: skip

    want_check = selected("check", args.cases)
    case_plan = []
    for b in args.batches:
        for c in args.contexts:
            vs = [v for v in VARIANTS if selected(f"{v}:b{b}:{_ctx_label(c)}", args.cases)]
            full = selected(f"fused_full:b{b}:{_ctx_label(c)}", args.cases)
            if vs or full:
                case_plan.append((b, c, vs, full))
    # the target case (largest batch and context) first, then the others
    b_t, c_t = max(args.batches), max(args.contexts)
    case_plan.sort(key=lambda x: (x[0] != b_t or x[1] != c_t, x[0], x[1]))
    mb_kinds = [k for k in ("exact", "fused") if selected(f"maxbatch:{k}", args.cases)]
    total = int(want_check) + len(case_plan) + len(mb_kinds) + 1

    progress = Progress(total, enabled=not args.no_progress, desc="generate bench")
    bench = GenerateBench(args, progress)
    rows: list[dict] = []
    mb: dict[str, dict] = {}
    check_row = None
    try:
        with torch.inference_mode():
            t0 = time.perf_counter()
            bench.build_model()
            bench.pick_sdpa_backends()
            if args.smoke and not bench.cuda and bench.n_layers > 1:  # exercise the layer cut on the target case
                bench.smoke_budget = max(bench.estimate(v, b_t, c_t, bench.n_layers - 1) for v in VARIANTS)
            env.update(model_layers=bench.n_layers, weights_GiB=round(bench.weights_bytes / GiB, 2),
                       sdpa_backend=bench.sdpa_name, sdpa_gqa=bench.sdpa_gqa, dtype=args.dtype)  # fmt: skip
            progress.write(f"model: {bench.n_layers} layers, {bench.weights_bytes / GiB:.2f} GiB of {args.dtype} "
                           f"weights on {args.device} in {time.perf_counter() - t0:.1f} s; SDPA backend for exact "
                           f"and unfused: {bench.sdpa_name}; GQA in transformers' sdpa: {bench.sdpa_gqa}")  # fmt: skip
            progress.step("model")
            wants_fused = any("fused" in vs for _, _, vs, _ in case_plan) or "fused" in mb_kinds
            if bench.cuda and wants_fused:
                try:
                    progress.write(bench.pretune(b_t, c_t))
                except Exception as e:
                    progress.write(f"fused attention autotune at the target shape failed: {_err(e)}")
                    bench.free()
            if want_check:
                check_row = bench.check()
                progress.step("check")
            for i, (b, c, vs, full) in enumerate(case_plan):
                case_rows = bench.run_case(b, c, vs) if vs else []
                ran_with = max((r.get("layers") or 0 for r in case_rows), default=0)
                if full and (not vs or ran_with < bench.n_layers) and not bench.over_budget():
                    case_rows.append(bench.full_layers_row(b, c))
                bench.annotate(case_rows)
                rows += case_rows
                progress.step(f"B={b} ctx={c}")
                if i == 0:  # the max-batch search right after the target case
                    for kind in mb_kinds:
                        mb[kind] = bench.max_batch(kind)
                        progress.step(f"maxbatch {kind}")
            for kind in mb_kinds:
                if kind not in mb:
                    mb[kind] = bench.max_batch(kind)
                    progress.step(f"maxbatch {kind}")
    except Exception as e:  # model build or something outside a case: report what there is
        print(f"generate benchmark aborted: {_err(e)}", flush=True)
        traceback.print_exc(limit=-8, file=sys.stdout)
        rows.append(dict(case="setup", error=_err(e)))
    finally:
        progress.close()

    if mb.get("exact", {}).get("B") and mb.get("fused", {}).get("B"):
        mb["fused"]["x_exact"] = mb["fused"]["B"] / mb["exact"]["B"]
    order = {v: i for i, v in enumerate(("exact", "exact_prealloc", "fused", "unfused", "fused_full"))}
    rows.sort(key=lambda r: (r.get("B") or 0, r.get("ctx") or 0, order.get(r.get("variant"), 9)))
    summary = summarize(check_row, rows, mb, b_t, c_t, bench.n_layers, smoke=args.smoke)
    summary.append(f"total time {bench.elapsed():.0f} s")
    all_rows = ([check_row] if check_row else []) + rows + list(mb.values())
    try:
        paths = write_results(all_rows, args.out_dir, "generate", env=env, columns=TABLE + ["rel_err", "passed"],
                              summary=summary, extra={"check": check_row, "maxbatch": mb})  # fmt: skip
        where = f"results: {paths[0]} and {paths[1]}"
    except Exception as e:
        where = f"results not written to {args.out_dir}: {_err(e)}"
    if args.json:
        payload = {"env": env, "check": check_row, "rows": rows, "maxbatch": mb, "summary": summary}
        try:
            write_json(args.json, payload)
            where += f"; JSON: {args.json}"
        except Exception as e:
            where += f"; JSON not written: {_err(e)}"

    print()
    print(f"== generate: decode tokens/s ({args.steps} steps after {args.warmup} warm-up), KV and peak memory; "
          f"{env.get('gpu', env.get('device'))}, {args.dtype}")  # fmt: skip
    print_table(rows, TABLE, max_width=48)
    if mb:
        print()
        print_table(list(mb.values()), MB_TABLE, max_width=48)
    print()
    print(where)
    for line in summary:
        print(line)
    if args.plot:
        try:
            print(f"wrote {plot_generate(rows, mb, env, args.plot)}")
        except (OSError, ValueError) as e:
            print(f"plot not written: {_err(e)}")
    sys.stdout.flush()
    return 0


VARIANT_LABELS = {"exact": "exact, DynamicCache", "exact_prealloc": "exact, written in place", "fused": "fused TQ4",
                  "unfused": "unfused TQ4", "fused_full": "fused TQ4 (all layers)"}  # fmt: skip


def plot_generate(rows: list[dict], maxbatch: dict, env: dict, path: str | Path) -> Path:
    """Decode tokens/s per (batch, context) and variant (eager bars, CUDA-graph replay hatched), KV memory, and
    the max batch at the search's context, for whichever of them the results hold. Writes a PNG at path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("tok_s") and r.get("variant") in VARIANT_LABELS]
    kinds = [k for k in ("exact", "fused") if k in (maxbatch or {}) and maxbatch[k].get("B")]
    if not ok and not kinds:
        raise ValueError("no decode rows with tokens/s and no max-batch results to plot")
    ratios = ([2, 1] if ok else []) + ([1] if kinds else [])
    fig, axes = plt.subplots(1, len(ratios), figsize=(max(8.0, 5.2 * len(ratios) + 1), 4.6), squeeze=False,
                             gridspec_kw={"width_ratios": ratios})  # fmt: skip
    axes = list(axes[0])
    if ok:
        a1, a2 = axes[0], axes[1]
        groups = sorted({(r["B"], r["ctx"]) for r in ok})
        variants = [v for v in VARIANT_LABELS if any(r["variant"] == v for r in ok)]
        w = 0.8 / len(variants)
        for j, v in enumerate(variants):
            xs, eager, graph, kv = [], [], [], []
            for i, g in enumerate(groups):
                r = next((r for r in ok if r["variant"] == v and (r["B"], r["ctx"]) == g), None)
                if r is not None:
                    xs.append(i - 0.4 + w * (j + 0.5))
                    eager.append(r["tok_s"])
                    graph.append(r.get("graph_tok_s"))
                    kv.append(r.get("kv_GiB") or 0.0)
            a1.bar(xs, eager, w, color=f"C{j}", label=VARIANT_LABELS[v])
            for x, e, gr in zip(xs, eager, graph, strict=True):
                if gr and gr > e:
                    a1.bar([x], [gr - e], w, bottom=[e], color=f"C{j}", alpha=0.35, hatch="//", edgecolor=f"C{j}")
            a2.bar(xs, kv, w, color=f"C{j}")
        labels = [f"B {b}, {c // 1024}K" for b, c in groups]
        a1.set_xticks(range(len(groups)), labels)
        a1.set_ylabel("decode tokens/s")
        a1.set_yscale("log")
        a1.set_ylim(bottom=min(r["tok_s"] for r in ok) / 1.5)
        a1.set_title("eager (solid); replayed from CUDA graphs (hatched, on top)", fontsize=9)
        a1.legend(fontsize=8, loc="upper left")
        a2.set_xticks(range(len(groups)), labels)
        a2.set_ylabel("KV cache GiB")
        a2.set_title("KV memory", fontsize=9)
    if kinds:
        a3 = axes[-1]
        a3.bar(range(len(kinds)), [maxbatch[k]["B"] for k in kinds], 0.6, color=["C0", "C2"][: len(kinds)])
        for i, k in enumerate(kinds):
            a3.annotate(str(maxbatch[k]["B"]), (i, maxbatch[k]["B"]), ha="center", va="bottom", fontsize=9)
        a3.set_xticks(range(len(kinds)), [VARIANT_LABELS[k] for k in kinds], fontsize=8)
        ctx = maxbatch[kinds[0]].get("ctx", 0)
        ratio = ""
        if len(kinds) == 2:
            ratio = f" ({maxbatch['fused']['B'] / maxbatch['exact']['B']:.2f}x)"
        a3.set_title(f"largest batch at {ctx // 1024}K context{ratio}", fontsize=9)
    layers = sorted({r["layers"] for r in ok} | {maxbatch[k].get("layers", 0) for k in kinds} - {0})
    fig.suptitle(f"generate(): Llama-3.1-8B-shaped model, random weights, {'/'.join(map(str, layers))} layers; "
                 f"{env.get('gpu', env.get('device', ''))}", fontsize=10)  # fmt: skip
    return save_figure(fig, path, env, ("date_utc", "torch", "triton", "transformers"), (0, 0.03, 1, 0.95))


def main(argv: list[str] | None = None) -> int:
    prog = "turboquant-vllm bench generate" if __name__.startswith("turboquant_vllm_bench") else "generate.py"
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    if args.plot_from:
        return plot_only(p, args, _plot_saved)
    return run(args)


def _plot_saved(data: dict, png: str) -> Path:
    return plot_generate(data["rows"], data.get("maxbatch") or {}, data.get("env", {}), png)


if __name__ == "__main__":
    sys.exit(main())
