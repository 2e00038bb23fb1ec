"""GPU checks of the compressed cache layer (the compress kernel compiled for the device). Runs only where CUDA
exists."""

import pytest
import torch

from turboquant_vllm.cache.layer import CompressedLayer, TurboQuantSettings

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compress_every_gives_the_codes_of_compress_every_one(dtype):
    """Tokens compressed 16 at a time (one launch, a wider tile) get the bytes they get one at a time."""
    g = torch.Generator().manual_seed(0)
    total, prefill = 150, 100
    k = torch.randn(2, 4, total, 128, generator=g).to("cuda", dtype)
    v = torch.randn(2, 4, total, 128, generator=g).to("cuda", dtype)
    one = CompressedLayer(128, TurboQuantSettings(k_bits=4, v_bits=3, window=8, sinks=4))
    batched = CompressedLayer(128, TurboQuantSettings(k_bits=4, v_bits=3, window=8, sinks=4, compress_every=16))
    for layer in (one, batched):
        layer.update(k[:, :, :prefill], v[:, :, :prefill])
        for t in range(prefill, total):
            layer.update(k[:, :, t : t + 1], v[:, :, t : t + 1])
    n = batched.num_compressed
    assert one.num_compressed == total - 4 - 8 and total - 4 - 8 - 15 <= n < one.num_compressed
    assert torch.equal(batched.k_packed[:, :, :n], one.k_packed[:, :, :n])
    assert torch.equal(batched.v_packed[:, :, :n], one.v_packed[:, :, :n])
    assert torch.equal(batched.norms[:, :, :n], one.norms[:, :, :n])
    mk, _ = batched.materialize()
    assert torch.equal(mk[:, :, 4 + n :], k[:, :, 4 + n :])
