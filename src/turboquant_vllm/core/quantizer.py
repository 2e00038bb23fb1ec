"""TurboQuant quantizers (PyTorch reference implementations).

TurboQuantMSE: x -> (||x||, idx = nearest centroid of each coordinate of Pi x / ||x||).
TurboQuantProd: (bits - 1)-bit TurboQuantMSE plus a 1-bit QJL sketch of the residual, which makes
inner-product estimates unbiased: x_hat = ||x|| (u_mse + sqrt(pi/2) / d * ||r|| S^T sign(S r)).

Inputs: any leading shape [..., dim], float16 / bfloat16 / float32, any device. All arithmetic is
float32; codebook indices are uint8, norms float32.
"""

from __future__ import annotations

import math

import torch

from .codebook import check_bits, check_dim, lloyd_max_codebook
from .rotation import make_rotation

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_QJL_SEED_OFFSET = 0x51_4A4C  # keeps the QJL matrix independent of the rotation for one seed


def check_vectors(x: torch.Tensor, dim: int, name: str = "x") -> None:
    """Raise TypeError/ValueError for a non-float tensor, a wrong last dim or non-finite values."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != dim:
        raise ValueError(f"{name} must have last dim {dim}, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf values")


class TurboQuantMSE:
    """MSE-optimal TurboQuant: random rotation + per-coordinate Lloyd-Max codebook.

    Args:
        dim: vector length d (>= 2).
        bits: bits per coordinate, 1..8.
        seed: seed of the rotation.
        rotation: "qr" (Haar, default) or "hadamard" (power-of-two dim).
    """

    def __init__(self, dim: int, bits: int, *, seed: int = 0, rotation: str = "qr"):
        self.dim = check_dim(dim)
        self.bits = check_bits(bits)
        self.seed = int(seed)
        self.rotation_kind = rotation
        codebook = lloyd_max_codebook(self.dim, self.bits)
        self.centroids = codebook.centroids  # float32 [2**bits]
        self.boundaries = codebook.boundaries  # float32 [2**bits - 1]
        self.rotation = make_rotation(self.dim, self.seed, rotation)  # float32 [d, d]

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.rotation.device != device:
            self.rotation = self.rotation.to(device)
            self.centroids = self.centroids.to(device)
            self.boundaries = self.boundaries.to(device)
        return self.rotation, self.centroids, self.boundaries

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d] -> Pi x, float32."""
        rot, _, _ = self._on(x.device)
        return x.float() @ rot.T

    def unrotate(self, y: torch.Tensor) -> torch.Tensor:
        """Pi^T y, float32."""
        rot, _, _ = self._on(y.device)
        return y.float() @ rot

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., d] -> (indices uint8 [..., d], norms float32 [...])."""
        check_vectors(x, self.dim)
        _, _, bounds = self._on(x.device)
        x32 = x.float()
        norms = torch.linalg.vector_norm(x32, dim=-1)
        unit = x32 / norms.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
        idx = torch.bucketize(self.rotate(unit), bounds)
        return idx.to(torch.uint8), norms

    def dequantize(
        self, indices: torch.Tensor, norms: torch.Tensor, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """(indices [..., d], norms [...]) -> x_hat [..., d] in dtype."""
        if indices.shape[-1] != self.dim:
            raise ValueError(f"indices must have last dim {self.dim}, got shape {tuple(indices.shape)}")
        if norms.shape != indices.shape[:-1]:
            raise ValueError(f"norms shape {tuple(norms.shape)} must equal indices.shape[:-1] {indices.shape[:-1]}")
        _, cents, _ = self._on(indices.device)
        y = cents[indices.long()]
        return (self.unrotate(y) * norms.float().unsqueeze(-1)).to(dtype)


class TurboQuantProd:
    """Inner-product TurboQuant: (bits - 1)-bit MSE stage + 1-bit QJL on the residual.

    quantize(x) -> (mse_indices uint8 [..., d], norms float32 [...], qjl_signs uint8 [..., d] in {0, 1},
    residual_norms float32 [...]). With bits == 1 the MSE stage is empty (all-zero indices, u_mse = 0).
    """

    def __init__(self, dim: int, bits: int, *, seed: int = 0, rotation: str = "qr"):
        self.dim = check_dim(dim)
        self.bits = check_bits(bits)
        self.seed = int(seed)
        self.mse = TurboQuantMSE(dim, bits - 1, seed=seed, rotation=rotation) if bits > 1 else None
        g = torch.Generator(device="cpu")
        g.manual_seed(self.seed + _QJL_SEED_OFFSET)
        self.sketch = torch.randn(self.dim, self.dim, generator=g)  # S, float32 [d, d]
        self.qjl_scale = math.sqrt(math.pi / 2.0) / self.dim

    def _sketch_on(self, device: torch.device) -> torch.Tensor:
        if self.sketch.device != device:
            self.sketch = self.sketch.to(device)
        return self.sketch

    def _mse_unit(self, unit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mse is None:
            return torch.zeros(unit.shape, dtype=torch.uint8, device=unit.device), torch.zeros_like(unit)
        idx, n = self.mse.quantize(unit)
        return idx, self.mse.dequantize(idx, n)

    def quantize(self, x: torch.Tensor):
        check_vectors(x, self.dim)
        x32 = x.float()
        norms = torch.linalg.vector_norm(x32, dim=-1)
        unit = x32 / norms.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
        idx, u_mse = self._mse_unit(unit)
        resid = unit - u_mse
        rnorm = torch.linalg.vector_norm(resid, dim=-1)
        signs = (resid @ self._sketch_on(x.device).T >= 0).to(torch.uint8)
        return idx, norms, signs, rnorm

    def _parts(self, indices, norms, signs, rnorm):
        if self.mse is None:
            u_mse = torch.zeros(*indices.shape, dtype=torch.float32, device=indices.device)
        else:
            u_mse = self.mse.dequantize(indices, torch.ones_like(norms, dtype=torch.float32))
        pm = signs.float() * 2.0 - 1.0
        return u_mse, pm

    def dequantize(self, indices, norms, signs, rnorm, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        u_mse, pm = self._parts(indices, norms, signs, rnorm)
        qjl = self.qjl_scale * rnorm.float().unsqueeze(-1) * (pm @ self._sketch_on(pm.device))
        return ((u_mse + qjl) * norms.float().unsqueeze(-1)).to(dtype)

    def estimate_inner_product(self, y: torch.Tensor, indices, norms, signs, rnorm) -> torch.Tensor:
        """Unbiased estimate of <y, x> for y [..., d] broadcastable against the quantized x."""
        check_vectors(y, self.dim, "y")
        u_mse, pm = self._parts(indices, norms, signs, rnorm)
        y32 = y.float()
        sy = y32 @ self._sketch_on(y.device).T
        est = (y32 * u_mse).sum(-1) + self.qjl_scale * rnorm.float() * (sy * pm).sum(-1)
        return est * norms.float()
