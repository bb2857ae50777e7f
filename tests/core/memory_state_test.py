"""The memory mechanisms' recurrent-state helpers: linear attention on top of a carried memory equals
the explicit loop `o_t = scale · q_t (S_0 + Σ_{j≤t} k_j u_jᵀ)` in float64 (GQA, several chunks),
splits exactly across calls and holds its shape annotations; the shift buffer keeps the last W
tokens; a bad state is a clear error.
"""

import beartype
import chex
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

from attnjax.core import memory_state
from tests import tolerances
from tests.inputs import qkv

TOL = tolerances.output(jnp.float32)


def _loop(q, k, u, memory, scale):
  q, k, u, S = (np.asarray(x, np.float64) for x in (q, k, u, memory))
  B, T, N, _ = q.shape
  G = N // k.shape[2]
  out = np.zeros((B, T, N, u.shape[-1]))
  for t in range(T):
    S = S + np.einsum("bkf,bkd->bkfd", k[:, t], u[:, t])
    for n in range(N):
      out[:, t, n] = scale * np.einsum("bf,bfd->bd", q[:, t, n], S[:, n // G])
  return out, S


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_linear_with_state_equals_the_loop_and_splits_across_calls(impl):
  q, k, u = qkv(seed=31, T=10, h=5)
  S0 = 0.3 * jax.random.normal(jax.random.PRNGKey(2), (2, 2, 8, 5))
  run = jax.jit(lambda q, k, u, S: memory_state.linear_with_state(
      q, k, u, S, scale=0.7, chunk_size=4, implementation=impl))
  out, S = run(q, k, u, S0)
  expected, S64 = _loop(q, k, u, S0, 0.7)
  chex.assert_trees_all_close((out, S), (expected, S64), **TOL)
  first, S_mid = run(q[:, :6], k[:, :6], u[:, :6], S0)
  second, S_end = run(q[:, 6:], k[:, 6:], u[:, 6:], S_mid)
  chex.assert_trees_all_close((jnp.concatenate([first, second], 1), S_end), (out, S), **TOL)
  checked = jaxtyping.jaxtyped(memory_state.linear_with_state, typechecker=beartype.beartype)
  with pytest.raises(jaxtyping.TypeCheckError):   # the memory's value width is the values'
    jax.eval_shape(lambda *a: checked(*a, scale=1.0, chunk_size=4, implementation=impl),
                   q, k, u, S0[..., :4])


def test_shift_in_keeps_the_last_tokens():
  buffer = jnp.arange(2 * 3, dtype=jnp.float32).reshape(1, 3, 2)
  new = -jnp.arange(2 * 2, dtype=jnp.float32).reshape(1, 2, 2) - 1
  stream, kept = memory_state.shift_in(buffer, new)
  chex.assert_trees_all_equal(stream, jnp.concatenate([buffer, new], axis=1))
  chex.assert_trees_all_equal(kept, stream[:, 2:])
  stream, kept = memory_state.shift_in(jnp.zeros((1, 0, 2)), new)
  assert kept.shape == (1, 0, 2) and stream.shape == (1, 2, 2)


def test_checked_state_zeros_and_errors():
  shapes, letters = {"memory": (2, 3)}, {"memory": "[B, F]"}
  chex.assert_trees_all_equal(memory_state.checked_state("op", None, shapes, letters),
                              {"memory": jnp.zeros((2, 3))})
  with pytest.raises(ValueError, match=r"op: `initial_state` must be the dict \['memory'\]"):
    memory_state.checked_state("op", (jnp.zeros((2, 3)),), shapes, letters)
  with pytest.raises(ValueError, match=r"op: `initial_state\['memory'\]` must have shape \[B, F\]"):
    memory_state.checked_state("op", {"memory": jnp.zeros((2, 4))}, shapes, letters)
  with pytest.raises(ValueError, match="op: recurrent decoding needs `q_offset` as one scalar"):
    memory_state.check_recurrent_call("op", causal=True, segment_ids=None, kv_lengths=None,
                                      q_offset=jnp.zeros((2,), jnp.int32), T=3, S=3)
