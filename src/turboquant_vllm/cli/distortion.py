"""`turboquant-vllm distortion`: distortion vs bits against the paper's bounds (CPU, seconds).

Prints, per bit width, the Lloyd-Max codebook's analytic MSE distortion, the empirical distortion of
TurboQuantMSE on random unit vectors, the inner-product error of TurboQuantMSE and TurboQuantProd on random unit
pairs, the bounds of arXiv 2504.19874 (Theorems 1-3) and the ratios to the lower bounds.

    turboquant-vllm distortion --dim 128 --max-bits 6 --samples 20000 --plot docs/distortion.png
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dim", type=int, default=128, help="vector length d (default 128, a common head_dim)")
    p.add_argument("--max-bits", type=int, default=6, help="measure bits 1..MAX_BITS (1..8, default 6)")
    p.add_argument("--samples", type=int, default=4096, help="random unit vectors (and y's) per bit width")
    p.add_argument("--draws", type=int, default=8, help="independent quantizers the samples are spread over")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples and of the quantizers (default 0)")
    p.add_argument("--plot", help="write the two-panel PNG (MSE distortion, inner-product error) here")
    p.add_argument("--json", help="write every row to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def format_tables(rows: list[dict]) -> list[str]:
    """The MSE table and the inner-product table (errors x d, so the columns read as multiples of 1/d).

    "paper" columns: the values arXiv 2504.19874 quotes for b = 1..4 (Theorems 1 and 2), "-" beyond.
    """
    d = rows[0]["dim"]
    mse_cols = [("bits", "bits", "{}"), ("analytic", "mse_analytic", "{:.5f}"),
                ("empirical", "mse_empirical", "{:.5f}"), ("+-", "mse_empirical_stderr", "{:.1e}"),
                ("lower 4^-b", "mse_lower", "{:.5f}"), ("upper", "mse_upper", "{:.5f}"),
                ("analytic/lower", "mse_analytic_ratio", "{:.3f}"),
                ("empirical/lower", "mse_empirical_ratio", "{:.3f}"), ("paper", "mse_paper", "{}")]  # fmt: skip
    ip_cols = [("bits", "bits", "{}"), ("MSE err x d", "ip_err_mse", "{:.4f}"),
               ("Prod err x d", "ip_err_prod", "{:.4f}"), ("paper x d", "ip_err_prod_paper", "{:.3g}"),
               ("lower x d", "ip_lower", "{:.5f}"), ("Prod upper x d", "ip_upper_prod", "{:.4f}"),
               ("MSE/lower", "ip_err_mse_ratio", "{:.3f}"), ("Prod/lower", "ip_err_prod_ratio", "{:.3f}"),
               ("MSE slope", "ip_slope_mse", "{:.4f}"), ("Prod slope", "ip_slope_prod", "{:.4f}")]  # fmt: skip
    scaled = {"ip_err_mse", "ip_err_prod", "ip_err_prod_paper", "ip_lower", "ip_upper_prod"}

    def cell(r: dict, key: str, fmt: str) -> str:
        v = r.get(key)
        return "-" if v is None else fmt.format(v * d if key in scaled else v)

    lines: list[str] = []
    for title, cols in (("MSE distortion E||x - x_hat||^2 (unit x)", mse_cols),
                        (f"inner-product error E[(<y,x> - <y,x_hat>)^2] x d (unit x, y; d = {d}); slope = "
                         "E[<y,x_hat><y,x>] / E[<y,x>^2], 1 = unbiased", ip_cols)):  # fmt: skip
        cells = [[h for h, _, _ in cols]]
        for r in rows:
            cells.append([cell(r, key, fmt) for _, key, fmt in cols])
        widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
        lines += ["", title]
        for i, c in enumerate(cells):
            lines.append("  ".join(x.rjust(w) for x, w in zip(c, widths, strict=True)))
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
    return lines


def run(args: argparse.Namespace) -> int:
    from ..core.codebook import check_bits
    from ..quality.distortion import distortion_table, plot_distortion

    try:
        max_bits = check_bits(args.max_bits, "--max-bits")
        t0 = time.perf_counter()
        rows = distortion_table(args.dim, range(1, max_bits + 1), args.samples, args.seed, args.draws,
                                progress=not args.no_progress and args.samples * max_bits >= 50_000)  # fmt: skip
    except (TypeError, ValueError) as e:
        print(f"turboquant-vllm distortion: error: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - t0
    draws = rows[0]["draws"]
    print(f"d = {args.dim}, bits 1..{max_bits}, {args.samples} random unit x (and as many random unit y) per bit "
          f"width, over {draws} quantizers, seed {args.seed}; torch {torch.__version__}, {seconds:.1f} s")  # fmt: skip
    for line in format_tables(rows):
        print(line)
    if args.json:
        result = {"dim": args.dim, "max_bits": max_bits, "samples": args.samples, "draws": draws, "seed": args.seed,
                  "seconds": seconds, "torch": torch.__version__, "argv": list(sys.argv), "rows": rows}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        plot_distortion(rows, args.plot)
        print(f"wrote {args.plot}")
    return 0
