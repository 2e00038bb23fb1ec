"""`turboquant-vllm bench`: the CLI parses, --help works, and benchmarks/generate.py --smoke runs end to end on CPU."""

import argparse
import json
from pathlib import Path

import pytest

from turboquant_vllm.cli import bench
from turboquant_vllm.cli.main import main

ROOT = Path(__file__).resolve().parents[1]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench")
    bench.add_arguments(p)
    return p


def test_bench_help_lists_both_benchmarks(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "attention" in out and "generate" in out


@pytest.mark.parametrize("name", ["attention", "generate"])
def test_every_option_reaches_the_script(name):
    argv = ["--quick", "--json", "r.json", "--cases", "fused:b16:*", "-h"]
    args = _parser().parse_args([name, *argv])
    assert args.bench_script == name and args.script_args == argv
    assert _parser().parse_args([name]).script_args == []


def test_the_scripts_are_found_in_the_checkout():
    assert bench.find_script("generate") == ROOT / "benchmarks" / "generate.py"


@pytest.mark.parametrize(
    "name, options, text",
    [
        ("generate", ("--smoke", "--quick", "--json", "--out-dir", "--cases"), "turboquant-vllm bench generate"),
        ("attention", ("--quick", "--json", "--out-dir", "--plot", "--plot-from"), "% of bandwidth"),
    ],
)
def test_help_is_the_scripts_own(capsys, name, options, text):
    assert main(["bench", name, "--help"]) == 0
    out = capsys.readouterr().out
    for opt in options:
        assert opt in out
    assert text in out


def test_bad_option_is_a_usage_error(capsys):
    assert main(["bench", "generate", "--no-such-option"]) == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_clear_error_without_the_repository(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench, "candidate_dirs", lambda: [tmp_path / "benchmarks"])
    assert main(["bench", "generate", "--smoke"]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "source repository" in err and bench.ENV_DIR in err


def test_generate_smoke_runs_end_to_end(tmp_path, capsys):
    out_json = tmp_path / "generate_smoke.json"
    rc = main(["bench", "generate", "--smoke", "--no-progress", "--json", str(out_json), "--out-dir", str(tmp_path)])
    stdout = capsys.readouterr().out
    assert rc == 0, stdout[-3000:]

    res = json.loads(out_json.read_text())
    assert (tmp_path / "generate.json").is_file() and (tmp_path / "generate.md").is_file()
    assert res["env"]["device"] == "cpu" and res["env"]["mode"] == "smoke"

    check = res["check"]
    assert check["passed"] is True and check["rel_err"] < 2e-2 and check["fused_mode"] is True, check

    rows = res["rows"]
    assert not [r for r in rows if r.get("error")], rows
    variants = {(r["variant"], r["B"]) for r in rows}
    for b in (1, 2):
        assert {("exact", b), ("fused", b), ("unfused", b)} <= variants
    for r in rows:
        assert r["tok_s"] > 0 and r["kv_bytes"] > 0
        if not r["variant"].startswith("exact"):
            assert r["kv_x"] > 3.5  # fp32 tiny model: 512 vs 72 bytes per token and head
    # the smoke's byte budget cuts the layers of the largest case, which then also runs with all of them
    cut = [r for r in rows if r["B"] == 2 and r["variant"] != "fused_full"]
    assert cut and all(r["layers"] == 1 for r in cut)
    assert any(r["variant"] == "fused_full" and r["layers"] == 2 for r in rows)

    mb = res["maxbatch"]
    assert mb["exact"]["B"] >= 1 and mb["fused"]["B"] >= 3 * mb["exact"]["B"], mb
    assert "TARGET" in stdout and "CHECK" in stdout
    # the compact table comes last
    assert stdout.rstrip().splitlines()[-1].startswith(("total time", "NOTE", "ERRORS", "SMOKE", "TARGET"))


def test_graph_capture_keeps_the_eager_mask_rule():
    """generate.py --graphs: while capturing, transformers must skip the causal mask without padding, as eager
    decode does (older transformers treat stream capture as tracing even without a padding mask); the library
    function is restored after."""
    import torch
    from transformers import masking_utils

    script = bench.load_script(bench.find_script("generate"))
    original = masking_utils.is_tracing
    with script._eager_mask_rule():
        assert masking_utils.is_tracing(None) is False
        assert masking_utils.is_tracing(torch.ones(1)) == original(torch.ones(1))
    assert masking_utils.is_tracing is original


def test_generate_ratios_compare_the_same_batch_and_context():
    """x_exact and kv_x of a row come from the exact cache of the same B and context (DynamicCache, else the
    preallocated one), never from another case's."""
    script = bench.load_script(bench.find_script("generate"))
    gib = 1 << 30
    rows = [
        dict(variant="exact_prealloc", B=1, ctx=8, layers=4, tok_s=50.0, kv_bytes=4 * gib),
        dict(variant="fused", B=1, ctx=8, layers=4, tok_s=40.0, kv_bytes=1 * gib),
        dict(variant="exact_prealloc", B=16, ctx=8, layers=2, tok_s=600.0, kv_bytes=32 * gib),
        dict(variant="exact", B=16, ctx=8, layers=2, tok_s=300.0, kv_bytes=32 * gib),
        dict(variant="fused", B=16, ctx=8, layers=2, tok_s=900.0, kv_bytes=8 * gib),
    ]
    script.GenerateBench.annotate(rows)
    assert rows[1]["x_exact"] == 40.0 / 50.0 and rows[1]["kv_x"] == 4.0
    assert rows[4]["x_exact"] == 900.0 / 300.0 and rows[4]["kv_x"] == 4.0


def _decode_row(b, n, hkv=8, d=128, graph=True):
    row = dict(kind="decode", B=b, N=n, Hq=32, Hkv=hkv, d=d, sdpa_ms=0.05 * b, tq4_ms=0.03 * b, tq4_pct_bw=40.0,
               tq3_ms=0.04 * b)  # fmt: skip
    if graph:
        row.update(sdpa_graph_ms=0.04 * b, tq4_graph_ms=0.02 * b, tq3_graph_ms=0.035 * b)
    return row


def test_attention_plot_from_saved_results(tmp_path, capsys):
    attention = bench.load_script(bench.find_script("attention"))
    rows = [_decode_row(1, 32768), _decode_row(16, 32768), _decode_row(16, 32768, hkv=32), dict(kind="prefill", S=4096)]
    saved = tmp_path / "attention.json"
    saved.write_text(json.dumps({"env": {"gpu": "test GPU", "date_utc": "today"}, "rows": rows}))
    png = tmp_path / "plots" / "decode.png"
    assert attention.main(["--plot-from", str(saved), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    points = attention._decode_points(rows)
    assert [p["label"] for p in points] == ["1 x 32K", "16 x 32K", "16 x 32K\nHkv 32, d 128"]
    assert points[0]["tq4"] == pytest.approx(2.0) and points[0]["pct"] == pytest.approx(60.0)  # graph-replay time
    eager = attention._decode_points([_decode_row(1, 4096, graph=False)])[0]
    assert eager["tq4"] == pytest.approx(0.05 / 0.03) and not eager["graph"]


@pytest.mark.parametrize("content", [None, "[1, 2]", json.dumps({"env": {}, "rows": [dict(kind="prefill")]})])
def test_attention_plot_from_bad_input_is_a_clear_error(tmp_path, capsys, content):
    attention = bench.load_script(bench.find_script("attention"))
    saved = tmp_path / "r.json"
    if content is not None:
        saved.write_text(content)
    with pytest.raises(SystemExit) as e:
        attention.main(["--plot-from", str(saved), "--plot", str(tmp_path / "x.png")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert ("no result file" in err) or ("no 'rows'" in err) or ("no decode rows" in err)


def test_generate_plot_from_saved_results(tmp_path):
    generate = bench.load_script(bench.find_script("generate"))
    rows = [dict(case=f"{v}:b{b}:32k", variant=v, B=b, ctx=32768, layers=24, tok_s=t, graph_tok_s=g, kv_GiB=kv)
            for v, b, t, g, kv in [("exact", 16, 260.0, None, 48.0), ("exact_prealloc", 16, 640.0, 670.0, 48.0),
                                   ("fused", 16, 700.0, 980.0, 12.4), ("fused", 1, 35.0, 100.0, 1.0)]]  # fmt: skip
    rows.append(dict(case="check", variant="check"))
    mb = {"exact": dict(B=15, ctx=32768, layers=32), "fused": dict(B=59, ctx=32768, layers=32)}
    for payload in ({"env": {"gpu": "test GPU"}, "rows": rows, "maxbatch": mb}, {"rows": [], "maxbatch": mb},
                    {"rows": rows}):  # fmt: skip
        saved = tmp_path / "generate.json"
        saved.write_text(json.dumps(payload))
        png = tmp_path / "g.png"
        assert generate.main(["--plot-from", str(saved), "--plot", str(png)]) == 0
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        png.unlink()


def test_generate_plot_from_without_results_is_a_clear_error(tmp_path, capsys):
    generate = bench.load_script(bench.find_script("generate"))
    saved = tmp_path / "generate.json"
    saved.write_text(json.dumps({"rows": [dict(case="check", variant="check")], "maxbatch": {}}))
    with pytest.raises(SystemExit) as e:
        generate.main(["--plot-from", str(saved), "--plot", str(tmp_path / "g.png")])
    assert e.value.code == 2
    assert "no decode rows with tokens/s and no max-batch results" in capsys.readouterr().err
