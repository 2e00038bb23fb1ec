"""Distortion vs bits: our codebooks and quantizers against the paper's bounds (arXiv 2504.19874).

For a dimension d and bit widths b, every row holds:

- MSE distortion D_mse = E||x - x_hat||^2 of a unit vector x: the codebook's analytic value
  (`Codebook.distortion`, computed on the exact coordinate law) and the empirical mean of TurboQuantMSE
  over `samples` uniformly random unit vectors.
- Inner-product error D_prod = E[(<y, x> - <y, x_hat>)^2] for independent uniformly random unit x and y,
  for TurboQuantMSE at b bits and TurboQuantProd at b bits ((b - 1)-bit MSE stage + 1-bit QJL residual).
- Bias of the inner-product estimate, two ways. `ip_bias_*` = E[<y, x_hat> - <y, x>]: with y uniform this is
  zero for any quantizer by symmetry (y and -y are equally likely), so it only checks the sampling. The bias
  that matters is conditional on the true value, measured by the slope `ip_slope_*` =
  E[<y, x_hat> <y, x>] / E[<y, x>^2] of the estimate regressed on the truth: 1 for an unbiased estimator
  (Prod); for MSE it is E<x, x_hat> = 1 - D_mse < 1 (a Lloyd-Max reconstruction is orthogonal to its own
  error on average), i.e. inner products shrink toward 0, by 2/pi at 1 bit.
- The bounds, for unit x and y (||y|| = 1):
    MSE lower      4^-b                        (paper, Theorem 3, any quantizer)
    MSE upper      sqrt(3) * pi / 2 * 4^-b     (paper, Theorem 1, TurboQuant_mse)
    IP lower       (1 / d) * 4^-b              (paper, Theorem 3: ||y||^2 / d * 4^-b)
    IP upper       sqrt(3) * pi^2 / d * 4^-b   (paper, Theorem 2, TurboQuant_prod: sqrt(3) pi^2 ||y||^2 / d 4^-b;
                                                the paper also quotes the tighter small-b values
                                                1.57/d, 0.56/d, 0.18/d, 0.047/d for b = 1..4)
  The theorems bound the worst case over x and y of an expectation over the quantizer's randomness; with a
  Haar rotation, a uniformly random x sees the same law, so the averages here estimate the same quantity.

The samples are spread over `draws` independent quantizers (rotations and QJL matrices) seeded from `seed`;
the sample vectors come from a separate torch.Generator seeded from `seed` too, with an offset so that the
two random streams differ.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from ..core.codebook import check_bits, check_dim, lloyd_max_codebook, paper_upper_bound, shannon_lower_bound
from ..core.quantizer import TurboQuantMSE, TurboQuantProd

DEFAULT_BITS = (1, 2, 3, 4, 5, 6)
# The values the paper quotes for small b: D_mse (Theorem 1) and d * D_prod for ||y|| = 1 (Theorem 2).
PAPER_MSE = {1: 0.36, 2: 0.117, 3: 0.03, 4: 0.009}
PAPER_PROD_TIMES_D = {1: 1.57, 2: 0.56, 3: 0.18, 4: 0.047}
_SAMPLE_SEED_OFFSET = 1_000_003  # the sample stream must not replay the rotation's Gaussian stream
_CHUNK = 8192


def check_samples(samples: int, name: str = "samples") -> int:
    if isinstance(samples, bool) or not isinstance(samples, int):
        raise TypeError(f"{name} must be an int >= 1, got {type(samples).__name__} {samples!r}")
    if samples < 1:
        raise ValueError(f"{name} must be >= 1, got {samples}")
    return samples


def check_bit_widths(bits: int | Iterable[int]) -> list[int]:
    widths = [check_bits(bits)] if isinstance(bits, int) else [check_bits(b) for b in bits]
    if not widths:
        raise ValueError("bits must name at least one bit width, got none")
    return widths


def mse_lower_bound(bits: int) -> float:
    """4^-b: no quantizer of unit vectors at b bits per coordinate does better (paper, Theorem 3)."""
    return shannon_lower_bound(check_bits(bits))


def mse_upper_bound(bits: int) -> float:
    """sqrt(3) * pi / 2 * 4^-b: TurboQuant_mse's guarantee (paper, Theorem 1)."""
    return paper_upper_bound(check_bits(bits))


def ip_lower_bound(dim: int, bits: int, y_norm_sq: float = 1.0) -> float:
    """||y||^2 / d * 4^-b: the inner-product error lower bound for any quantizer (paper, Theorem 3)."""
    return y_norm_sq / check_dim(dim) * 4.0 ** -check_bits(bits)


def ip_upper_bound(dim: int, bits: int, y_norm_sq: float = 1.0) -> float:
    """sqrt(3) * pi^2 * ||y||^2 / d * 4^-b: TurboQuant_prod's inner-product error bound (paper, Theorem 2)."""
    return math.sqrt(3.0) * math.pi**2 * y_norm_sq / check_dim(dim) * 4.0 ** -check_bits(bits)


def analytic_distortion(dim: int, bits: int) -> float:
    """E||u - u_hat||^2 of the Lloyd-Max codebook for a unit vector in R^dim, from the exact coordinate law."""
    return lloyd_max_codebook(check_dim(dim), check_bits(bits)).distortion


def random_unit_vectors(n: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """n uniformly random unit vectors in R^dim (normalised Gaussians), float32 [n, dim]."""
    x = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    return (x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)).to(torch.float32)


class _Mean:
    """Running mean and standard error of a stream of float64 samples."""

    def __init__(self) -> None:
        self.n, self.s, self.s2 = 0, 0.0, 0.0

    def add(self, v: torch.Tensor) -> None:
        v = v.double()
        self.n += v.numel()
        self.s += float(v.sum())
        self.s2 += float((v * v).sum())

    @property
    def mean(self) -> float:
        return self.s / self.n

    @property
    def stderr(self) -> float:
        if self.n < 2:
            return math.nan
        var = max(self.s2 / self.n - self.mean**2, 0.0) * self.n / (self.n - 1)
        return math.sqrt(var / self.n)


def quantizer_seeds(seed: int, draws: int) -> list[int]:
    """The seeds of the `draws` independent quantizers of one run: disjoint for different `seed`s."""
    return [int(seed) * draws + k for k in range(draws)]


def empirical_distortion(dim: int, bits: int, samples: int = 4096, seed: int = 0, draws: int = 8) -> dict[str, float]:
    """Monte-Carlo estimates for one bit width, over `samples` pairs of independent random unit x, y.

    The samples are split evenly over `draws` independent quantizers (rotation and QJL matrix seeded by
    `quantizer_seeds(seed, draws)`), so the averages include the quantizer's randomness as the paper's
    expectations do: one fixed QJL matrix carries an O(1/d) bias of its own (its row norms), which is visible
    at 1-2 bits with ~10^4 samples. The `_stderr` values are the standard errors of the pooled samples.

    Returns mse_empirical (+ _stderr), ip_err_mse / ip_err_prod (+ _stderr), ip_bias_mse / ip_bias_prod and
    ip_slope_mse / ip_slope_prod (see the module docstring).
    """
    dim, bits, samples = check_dim(dim), check_bits(bits), check_samples(samples)
    draws = min(check_samples(draws, "draws"), samples)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed) + _SAMPLE_SEED_OFFSET)

    mse, err_m, err_p, bias_m, bias_p = _Mean(), _Mean(), _Mean(), _Mean(), _Mean()
    cross_m = cross_p = true_sq = 0.0
    for k, qseed in enumerate(quantizer_seeds(seed, draws)):
        mse_q = TurboQuantMSE(dim, bits, seed=qseed)
        prod_q = TurboQuantProd(dim, bits, seed=qseed)
        share = samples // draws + (1 if k < samples % draws else 0)
        for start in range(0, share, _CHUNK):
            n = min(_CHUNK, share - start)
            x = random_unit_vectors(n, dim, gen)
            y = random_unit_vectors(n, dim, gen)
            x_mse = mse_q.dequantize(*mse_q.quantize(x)).double()
            x_prod = prod_q.dequantize(*prod_q.quantize(x)).double()
            x, y = x.double(), y.double()
            true = (y * x).sum(-1)
            est_m = (y * x_mse).sum(-1)
            est_p = (y * x_prod).sum(-1)
            mse.add(((x_mse - x) ** 2).sum(-1))
            err_m.add((est_m - true) ** 2)
            err_p.add((est_p - true) ** 2)
            bias_m.add(est_m - true)
            bias_p.add(est_p - true)
            cross_m += float((est_m * true).sum())
            cross_p += float((est_p * true).sum())
            true_sq += float((true * true).sum())
    return {
        "mse_empirical": mse.mean,
        "mse_empirical_stderr": mse.stderr,
        "ip_err_mse": err_m.mean,
        "ip_err_mse_stderr": err_m.stderr,
        "ip_err_prod": err_p.mean,
        "ip_err_prod_stderr": err_p.stderr,
        "ip_bias_mse": bias_m.mean,
        "ip_bias_prod": bias_p.mean,
        "ip_slope_mse": cross_m / true_sq,
        "ip_slope_prod": cross_p / true_sq,
    }


def distortion_table(
    dim: int = 128,
    bits: int | Sequence[int] = DEFAULT_BITS,
    samples: int = 4096,
    seed: int = 0,
    draws: int = 8,
    *,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """One row per bit width: analytic and empirical distortions, bounds, and ratios to the lower bounds.

    Keys: bits, dim, samples, draws, mse_analytic, mse_empirical(_stderr), mse_lower, mse_upper, ip_err_mse(_stderr),
    ip_err_prod(_stderr), ip_bias_mse, ip_bias_prod, ip_slope_mse, ip_slope_prod, ip_lower, ip_upper_prod,
    the ratios mse_analytic_ratio, mse_empirical_ratio (to mse_lower), ip_err_mse_ratio, ip_err_prod_ratio
    (to ip_lower), and the paper's quoted values mse_paper, ip_err_prod_paper (None for b > 4).
    """
    dim, samples, draws = check_dim(dim), check_samples(samples), check_samples(draws, "draws")
    widths = check_bit_widths(bits)
    it: Iterable[int] = widths
    if progress:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover - tqdm is a dependency, but stay usable without it
            pass
        else:
            it = tqdm(widths, desc="bits", leave=False)
    rows = []
    for b in it:
        row: dict[str, Any] = {"bits": b, "dim": dim, "samples": samples, "draws": min(draws, samples)}
        row["mse_analytic"] = analytic_distortion(dim, b)
        row.update(empirical_distortion(dim, b, samples, seed, draws))
        row["mse_lower"] = mse_lower_bound(b)
        row["mse_upper"] = mse_upper_bound(b)
        row["ip_lower"] = ip_lower_bound(dim, b)
        row["ip_upper_prod"] = ip_upper_bound(dim, b)
        row["mse_analytic_ratio"] = row["mse_analytic"] / row["mse_lower"]
        row["mse_empirical_ratio"] = row["mse_empirical"] / row["mse_lower"]
        row["ip_err_mse_ratio"] = row["ip_err_mse"] / row["ip_lower"]
        row["ip_err_prod_ratio"] = row["ip_err_prod"] / row["ip_lower"]
        row["mse_paper"] = PAPER_MSE.get(b)
        row["ip_err_prod_paper"] = PAPER_PROD_TIMES_D[b] / dim if b in PAPER_PROD_TIMES_D else None
        rows.append(row)
    return rows


def plot_distortion(rows: Sequence[dict[str, Any]], path: str) -> None:
    """Write a two-panel PNG (log y): MSE distortion vs bits, and inner-product error vs bits, with the bounds."""
    if not rows:
        raise ValueError("rows must hold at least one bit width, got none")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dim, samples = int(rows[0]["dim"]), int(rows[0]["samples"])
    b = [r["bits"] for r in rows]

    def col(key: str) -> list[float]:
        return [r[key] for r in rows]

    def quoted(key: str) -> tuple[list[int], list[float]]:
        pts = [(r["bits"], r[key]) for r in rows if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.8))
    a1.plot(b, col("mse_upper"), "k--", label=r"upper bound $\frac{\sqrt{3}\pi}{2} 4^{-b}$ (Thm 1)")
    a1.plot(b, col("mse_analytic"), "o-", color="C0", label="Lloyd-Max codebook (analytic)")
    a1.plot(b, col("mse_empirical"), "x", color="C3", ms=9, label=f"TurboQuantMSE, {samples} random unit vectors")
    a1.plot(*quoted("mse_paper"), "D", color="0.45", mfc="none", ms=10, label="values quoted in the paper (Thm 1)")
    a1.plot(b, col("mse_lower"), "k:", label=r"lower bound $4^{-b}$ (Thm 3)")
    a1.set_title(f"MSE distortion E||x - x_hat||^2, unit x, d = {dim}")
    a1.set_ylabel("E||x - x_hat||^2")

    a2.plot(b, col("ip_upper_prod"), "k--", label=r"Prod upper bound $\frac{\sqrt{3}\pi^2}{d} 4^{-b}$ (Thm 2)")
    a2.plot(b, col("ip_err_prod"), "s-", color="C2", label="TurboQuantProd (unbiased)")
    a2.plot(b, col("ip_err_mse"), "o-", color="C0", label="TurboQuantMSE (biased: shrinks <y, x>)")
    a2.plot(*quoted("ip_err_prod_paper"), "D", color="0.45", mfc="none", ms=10,
            label="Prod values quoted in the paper (Thm 2)")  # fmt: skip
    a2.plot(b, col("ip_lower"), "k:", label=r"lower bound $\frac{1}{d} 4^{-b}$ (Thm 3)")
    a2.set_title(f"inner-product error, unit x and y, d = {dim}, {samples} pairs")
    a2.set_ylabel("E[(<y, x> - <y, x_hat>)^2]")

    for a in (a1, a2):
        a.set_yscale("log")
        a.set_xlabel("bits per coordinate b")
        a.set_xticks(b)
        a.grid(alpha=0.3, which="both")
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
