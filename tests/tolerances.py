"""Every numerical tolerance of the suite, by dtype. Gradients are looser than outputs (they sum over
more terms); relative-RMS bounds are for long reductions whose max error grows with length."""

import jax.numpy as jnp

# Output comparisons against a float32 / float64 reference: (atol, rtol).
OUTPUT = {jnp.float32: dict(atol=2e-5, rtol=2e-5), jnp.bfloat16: dict(atol=2e-2, rtol=2e-2)}
GRAD = {jnp.float32: dict(atol=1e-4, rtol=1e-4), jnp.bfloat16: dict(atol=6e-2, rtol=6e-2)}
# Relative RMS error ||a - b|| / ||b|| for whole tensors.
REL_RMS = {jnp.float32: 1e-5, jnp.bfloat16: 1.5e-2}
GRAD_REL_RMS = {jnp.float32: 5e-5, jnp.bfloat16: 3e-2}
# bf16 inputs against the same computation on fp32 inputs (input rounding dominates).
BF16_VS_FP32_REL_RMS = 3e-2


def key(dtype):
  return jnp.dtype(dtype).type


def output(dtype):
  return OUTPUT[key(dtype)]


def grad(dtype):
  return GRAD[key(dtype)]


def rel_rms(a, b):
  """||a - b|| / ||b|| in float32 (0 when both are zero)."""
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  den = jnp.sqrt(jnp.mean(b * b))
  return float(jnp.sqrt(jnp.mean((a - b) ** 2)) / jnp.where(den == 0, 1.0, den))
