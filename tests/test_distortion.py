"""Distortion vs bits (quality/distortion.py, `turboquant-vllm distortion`): bounds and independent estimates.

Tolerances are k standard errors of the Monte-Carlo mean at the sample count used, with the standard error
computed here from independently drawn samples, not taken from the function under test.
"""

import json
import math

import pytest
import torch

from turboquant_vllm.cli.main import main
from turboquant_vllm.core.codebook import lloyd_max_codebook
from turboquant_vllm.core.quantizer import TurboQuantProd
from turboquant_vllm.core.rotation import haar_rotation
from turboquant_vllm.quality.distortion import analytic_distortion, distortion_table, plot_distortion

DIM = 128
BITS = range(1, 7)
N = 8000  # samples per bit width of the shared table


@pytest.fixture(scope="module")
def table() -> dict[int, dict]:
    rows = distortion_table(DIM, BITS, samples=N, seed=3)
    assert [r["bits"] for r in rows] == list(BITS)
    return {r["bits"]: r for r in rows}


def unit(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return x / x.norm(dim=-1, keepdim=True)


def mean_and_stderr(v: torch.Tensor) -> tuple[float, float]:
    return v.mean().item(), v.std().item() / math.sqrt(v.numel())


@pytest.mark.parametrize("bits", BITS)
def test_analytic_distortion_strictly_between_the_bounds(bits, table):
    lower, upper = 4.0**-bits, math.sqrt(3) * math.pi / 2 * 4.0**-bits
    d_mse = analytic_distortion(DIM, bits)
    assert lower < d_mse < upper
    row = table[bits]
    assert row["mse_analytic"] == d_mse
    assert row["mse_lower"] == pytest.approx(lower, rel=1e-12)
    assert row["mse_upper"] == pytest.approx(upper, rel=1e-12)
    assert row["ip_lower"] == pytest.approx(lower / DIM, rel=1e-12)
    assert row["ip_upper_prod"] == pytest.approx(math.sqrt(3) * math.pi**2 / DIM * 4.0**-bits, rel=1e-12)
    assert row["mse_analytic_ratio"] == pytest.approx(d_mse / lower, rel=1e-12)
    assert row["ip_err_prod_ratio"] == pytest.approx(row["ip_err_prod"] / (lower / DIM), rel=1e-12)


@pytest.mark.parametrize("bits", BITS)
def test_empirical_mse_matches_the_codebook(bits, table):
    # Reference: rotate random unit vectors with our own Haar matrix, round each coordinate to the nearest
    # centroid of the codebook, and measure ||z - z_hat||^2 (a rotation keeps the norm of the error).
    cb = lloyd_max_codebook(DIM, bits)
    g = torch.Generator().manual_seed(100 + bits)
    z = unit(N, DIM, g) @ haar_rotation(DIM, 1000 + bits).double().T
    z_hat = cb.centroids.double()[torch.bucketize(z.float(), cb.boundaries)]
    ref, se = mean_and_stderr(((z - z_hat) ** 2).sum(-1))
    assert ref == pytest.approx(cb.distortion, abs=4 * se)
    row = table[bits]
    assert row["mse_empirical"] == pytest.approx(cb.distortion, abs=4 * se)  # se: same N, same law
    # The sample std itself is noisy at 5-6 bits (rare coordinates in the outer cells weigh a lot): +-35%.
    assert row["mse_empirical_stderr"] == pytest.approx(se, rel=0.35)


@pytest.mark.parametrize("bits", [1, 2])
def test_mse_inner_products_shrink_and_prod_is_unbiased(bits, table):
    row = table[bits]
    # Slope of <y, x_hat> on <y, x>: standard error ~ sqrt(E[noise^2] E[<y,x>^2] / N) / E[<y,x>^2], E[<y,x>^2] = 1/d.
    se_mse = math.sqrt(row["ip_err_mse"] * DIM / N)
    se_prod = math.sqrt(row["ip_err_prod"] * DIM / N)
    # MSE: slope = E<x, x_hat> = 1 - D_mse (a Lloyd-Max reconstruction is orthogonal to its error on average).
    assert row["ip_slope_mse"] == pytest.approx(1 - analytic_distortion(DIM, bits), abs=4 * se_mse + 0.005)
    assert row["ip_slope_mse"] < 1 - 10 * se_mse  # shrunk toward 0: 2/pi at 1 bit
    assert row["ip_slope_prod"] == pytest.approx(1.0, abs=4 * se_prod + 0.005)
    # The unconditional mean error is ~0 for both (y and -y are equally likely).
    assert abs(row["ip_bias_mse"]) < 5 * math.sqrt(row["ip_err_mse"] / N)
    assert abs(row["ip_bias_prod"]) < 5 * math.sqrt(row["ip_err_prod"] / N)


@pytest.mark.parametrize("bits", BITS)
def test_inner_product_errors_against_the_bounds(bits, table):
    row = table[bits]
    lower = 4.0**-bits / DIM
    upper = math.sqrt(3) * math.pi**2 / DIM * 4.0**-bits
    rel_se = math.sqrt(2.0 / N)  # (<y, e>)^2 is ~ a scaled chi-square(1): coefficient of variation sqrt(2)
    assert row["ip_err_prod"] * (1 + 4 * rel_se) < upper
    assert row["ip_err_prod"] > lower and row["ip_err_mse"] * (1 + 4 * rel_se) > lower
    # For y uniform and independent of x, E[<y, e>^2] = E||e||^2 / d exactly.
    assert row["ip_err_mse"] * DIM == pytest.approx(analytic_distortion(DIM, bits), rel=4 * rel_se)


def test_prod_error_matches_an_independent_estimate(table):
    # Same quantity through estimate_inner_product (not dequantize), other vectors and other quantizers.
    bits, n, draws = 2, 4000, 8
    g = torch.Generator().manual_seed(7)
    errs = []
    for k in range(draws):
        q = TurboQuantProd(DIM, bits, seed=500 + k)
        x, y = unit(n // draws, DIM, g).float(), unit(n // draws, DIM, g).float()
        est = q.estimate_inner_product(y, *q.quantize(x)).double()
        errs.append((est - (x.double() * y.double()).sum(-1)) ** 2)
    ref, se = mean_and_stderr(torch.cat(errs))
    assert ref * DIM == pytest.approx(math.pi / 2 * analytic_distortion(DIM, bits - 1), rel=0.1)
    assert table[bits]["ip_err_prod"] == pytest.approx(ref, abs=4 * se * math.sqrt(1 + n / N))


def test_seeded_and_reproducible():
    a = distortion_table(16, [1, 3], samples=300, seed=1, draws=3)
    b = distortion_table(16, [1, 3], samples=300, seed=1, draws=3)
    c = distortion_table(16, [1, 3], samples=300, seed=2, draws=3)
    assert a == b
    assert a[0]["mse_empirical"] != c[0]["mse_empirical"]
    one = distortion_table(16, 2, samples=1, draws=8)  # a single sample: one quantizer, no standard error
    assert one[0]["draws"] == 1 and math.isnan(one[0]["mse_empirical_stderr"])


def test_cli_end_to_end(tmp_path, capsys):
    png, js = tmp_path / "d.png", tmp_path / "d.json"
    argv = ["distortion", "--dim", "32", "--max-bits", "3", "--samples", "600", "--seed", "5", "--no-progress"]
    assert main([*argv, "--plot", str(png), "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "analytic/lower" in out and "Prod slope" in out and f"wrote {png}" in out
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    result = json.loads(js.read_text())
    assert result["dim"] == 32 and result["samples"] == 600 and result["seed"] == 5
    rows = result["rows"]
    assert [r["bits"] for r in rows] == [1, 2, 3]
    assert rows[0]["mse_analytic"] == pytest.approx(lloyd_max_codebook(32, 1).distortion)
    assert all(r["mse_lower"] < r["mse_analytic"] < r["mse_upper"] for r in rows)
    assert rows[0]["mse_paper"] == 0.36 and rows[2]["ip_err_prod_paper"] == pytest.approx(0.18 / 32)


def test_bad_inputs(tmp_path, capsys):
    with pytest.raises(ValueError, match="dim"):
        distortion_table(1, [1])
    with pytest.raises(TypeError, match="dim"):
        distortion_table(128.0, [1])
    with pytest.raises(ValueError, match="bits"):
        distortion_table(16, [0, 1])
    with pytest.raises(ValueError, match="bits"):
        distortion_table(16, [9])
    with pytest.raises(TypeError, match="bits"):
        distortion_table(16, [2.5])
    with pytest.raises(ValueError, match="at least one"):
        distortion_table(16, [])
    with pytest.raises(ValueError, match="samples"):
        distortion_table(16, [1], samples=0)
    with pytest.raises(TypeError, match="samples"):
        distortion_table(16, [1], samples=10.0)
    with pytest.raises(ValueError, match="draws"):
        distortion_table(16, [1], samples=10, draws=0)
    with pytest.raises(ValueError, match="rows"):
        plot_distortion([], str(tmp_path / "x.png"))
    assert main(["distortion", "--max-bits", "9", "--no-progress"]) == 2
    assert "--max-bits must be in [1, 8], got 9" in capsys.readouterr().err
    assert main(["distortion", "--samples", "0", "--plot", str(tmp_path / "no.png")]) == 2
    assert "samples must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "no.png").exists()
