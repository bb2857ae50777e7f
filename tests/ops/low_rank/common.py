"""Input builders and jaxpr probes shared by the tests/ops/low_rank/ tests.

`qkv` is `tests.inputs.qkv` with per-array keys (seed, seed + 1, seed + 2), the draws these tests
were written against.
"""

import jax
import jax.numpy as jnp

from tests import inputs


def rand(seed, *shape):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def qkv(T=19, S=19, N=4, K=2, H=8, h=6, B=2, seed=0):
  """`tests.inputs.qkv` with these tests' sizes and per-array keys."""
  return inputs.qkv(B=B, T=T, S=S, N=N, K=K, H=H, h=h, seed=seed, key_per_array=True)


shapes = inputs.intermediate_shapes


def has_t_by_s(shapes, T, S):
  """Whether some intermediate has both a T axis and a distinct S axis (T, S chosen unusual)."""
  if T == S:
    return any(sum(d == T for d in s) >= 2 for s in shapes)
  return any(T in s and S in s for s in shapes)
