"""Kernel dispatch: Triton kernels for CUDA tensors, their PyTorch twins (kernels/reference.py) elsewhere.

Dense paged attention has no Triton kernel: on CUDA the twin's gathers and SDPA calls run as they are.
"""

from kernels.reference import certified_decode, decode_attention, paged_attention, prefill_attention

__all__ = ["certified_decode", "decode_attention", "paged_attention", "prefill_attention"]
