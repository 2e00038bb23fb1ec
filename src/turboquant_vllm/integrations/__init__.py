"""Integrations with host libraries (transformers, vLLM)."""
