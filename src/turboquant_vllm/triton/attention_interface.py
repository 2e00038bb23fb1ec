"""The documented attention-interface API (implementation: turboquant_vllm.integrations.transformers)."""

from ..integrations.transformers import (
    disable_turboquant,
    enable_turboquant,
    fused_attention,
    install_fused_tq4_kv,
    install_triton_fa,
    register_triton_fa,
    triton_fa_forward,
    triton_fa_tq4_kv_forward,
    uninstall_fused_tq4_kv,
)

__all__ = [
    "disable_turboquant",
    "enable_turboquant",
    "fused_attention",
    "install_fused_tq4_kv",
    "install_triton_fa",
    "register_triton_fa",
    "triton_fa_forward",
    "triton_fa_tq4_kv_forward",
    "uninstall_fused_tq4_kv",
]
