"""Triton kernels for fastlora (installed as ``fastlora.kernels``; no model knowledge here)."""
