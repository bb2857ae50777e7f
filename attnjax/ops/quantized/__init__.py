"""Quantized attention: the papers' low-precision attention emulated in jnp on every platform.

  sage.py   SageAttention: INT8 QKᵀ with smoothed keys, fp16 or FP8 P̃V (arXiv:2410.02367)
  sage3.py  SageAttention3: microscaling FP4 attention and SageBwd, its trainable 8-bit form
            (arXiv:2505.11594)

The quantize-dequantize formats and the blocked attention loop they share: `attnjax.core.quantize`.
"""

from attnjax.ops.quantized import sage
from attnjax.ops.quantized import sage3
from attnjax.ops.quantized.sage import sage_attention
from attnjax.ops.quantized.sage3 import sage_attention3

__all__ = ["sage", "sage3", "sage_attention", "sage_attention3"]
