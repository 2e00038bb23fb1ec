"""Seeded random rotations of R^d.

Both are returned as a dense orthogonal matrix `Pi` (float32 [d, d]) with the convention
`x_rot = x @ Pi.T` (i.e. `Pi @ x` for a column vector) and `x = x_rot @ Pi`. A dense matrix is
what the Triton kernels consume (one [*, d] x [d, d] product on tensor cores), so the
Hadamard variant's O(d log d) transform is offered as a function for the PyTorch path only.

Default: "qr" (Haar-random). It exists for every head_dim (96 included), it is the rotation the
paper's analysis assumes, and on random and real keys its distortion matches the codebook's
prediction (see tests/test_core.py and docs/QUALITY.md). The randomised Hadamard needs a
power-of-two d; its distortion on Gaussian data is the same.
"""

from __future__ import annotations

import functools

import torch

ROTATIONS = ("qr", "hadamard")


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    return g


@functools.lru_cache(maxsize=64)
def _haar_cached(dim: int, seed: int) -> torch.Tensor:
    g = _generator(seed)
    a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    # Fix the signs so that Q is Haar-distributed (QR alone is not) and deterministic.
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    return q.to(torch.float32)


def haar_rotation(dim: int, seed: int = 0) -> torch.Tensor:
    """A Haar-random orthogonal matrix (QR of a Gaussian matrix, sign-fixed). float32 [dim, dim]."""
    return _haar_cached(int(dim), int(seed)).clone()


def is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def fast_walsh_hadamard(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Walsh-Hadamard transform over the last dim (a power of two), O(d log d)."""
    d = x.shape[-1]
    if not is_power_of_two(d):
        raise ValueError(f"Walsh-Hadamard needs a power-of-two last dim, got {d}")
    shape = x.shape
    y = x.reshape(-1, d)
    h = 1
    while h < d:
        y = y.view(-1, d // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return (y.reshape(shape) / d**0.5).to(x.dtype)


@functools.lru_cache(maxsize=64)
def _hadamard_cached(dim: int, seed: int) -> torch.Tensor:
    if not is_power_of_two(dim):
        raise ValueError(f"the Hadamard rotation needs a power-of-two head_dim, got {dim}; use rotation='qr'")
    signs = torch.randint(0, 2, (dim,), generator=_generator(seed)).to(torch.float64) * 2 - 1
    # Pi = H @ diag(signs): x_rot = H (signs * x).
    eye = torch.eye(dim, dtype=torch.float64)
    h = fast_walsh_hadamard(eye)  # rows of H (H is symmetric)
    return (h * signs.unsqueeze(0)).to(torch.float32)


def hadamard_rotation(dim: int, seed: int = 0) -> torch.Tensor:
    """Randomised Hadamard H @ diag(random signs) as a dense float32 [dim, dim] matrix."""
    return _hadamard_cached(int(dim), int(seed)).clone()


def make_rotation(dim: int, seed: int = 0, kind: str = "qr") -> torch.Tensor:
    """The rotation matrix Pi of the given kind ("qr" or "hadamard")."""
    if kind == "qr":
        return haar_rotation(dim, seed)
    if kind == "hadamard":
        return hadamard_rotation(dim, seed)
    raise ValueError(f"rotation must be one of {ROTATIONS}, got {kind!r}")
