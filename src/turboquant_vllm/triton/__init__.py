"""Triton entry points under their documented import path."""
