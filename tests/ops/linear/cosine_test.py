"""Cottention (attnjax/ops/linear/cosine.py): the recurrent and parallel forms equal the
cosine form, and decoding carries per-row counts.

Each property is checked against an explicit evaluation of the formula written out here."""


import jax
import jax.numpy as jnp
import pytest

from attnjax.core import feature_maps as fm
from attnjax.ops import linear as lin
from tests.inputs import qkv
from tests.ops.linear.helpers import IMPLS, assert_rel, causal_mask, heads, weighted


@pytest.mark.parametrize("causal", [True, False])
def test_cottention_recurrent_equals_parallel_cosine_form(causal):
  q, k, v = qkv(T=29)
  N, T = q.shape[2], q.shape[1]
  exponent = jnp.linspace(-1.0, 1.0, N)
  sims = jnp.einsum("btnf,bsnf->bnts", fm.l2_normalize(q), fm.l2_normalize(heads(k, N)))
  visible = causal_mask(T) if causal else jnp.ones((T, T), bool)
  n_t = jnp.sum(visible, axis=-1).astype(jnp.float32)                       # keys each query sees
  sigma = jax.nn.sigmoid(exponent)
  expected = weighted(jnp.where(visible, sims, 0.0), heads(v, N))
  expected = expected / n_t[None, :, None, None] ** sigma[None, None, :, None]
  for impl in IMPLS:
    out = lin.cosine_linear_attention(q, k, v, causal=causal, length_exponent=exponent,
                                     implementation=impl)
    assert_rel(out, expected)


def test_cottention_recurrent_decode_with_per_row_offsets_and_padding():
  """Rows at different positions decode together; the `n_t^σ` count comes from each row's
  q_offset, and new tokens past kv_lengths leave the state alone."""
  q, k, v = qkv(T=12)
  # Compiled (eager dispatch compiles every primitive separately); flags static, arrays traced.
  attend = jax.jit(lin.cosine_linear_attention, static_argnames=("causal", "return_final_state"))
  full = attend(q, k, v, causal=True)
  # Row 0 has consumed 5 tokens, row 1 has consumed 8; each then reads its next 3.
  starts = (5, 8)
  _, s0 = attend(q[:1, :5], k[:1, :5], v[:1, :5], causal=True, return_final_state=True)
  _, s1 = attend(q[1:, :8], k[1:, :8], v[1:, :8], causal=True, return_final_state=True)
  take = lambda x: jnp.stack([x[0, 5:8], x[1, 8:11]])
  out, state = attend(
      take(q), take(k), take(v), causal=True, q_offset=jnp.array(starts),
      initial_state=jnp.concatenate([s0, s1]), return_final_state=True,
      kv_lengths=jnp.array([3, 2]))
  assert_rel(out[0], full[0, 5:8])
  assert_rel(out[1, :2], full[1, 8:10])
  # Row 1's third token was padding: its state is the state after token 9.
  _, after = attend(q[1:, :10], k[1:, :10], v[1:, :10], causal=True, return_final_state=True)
  assert_rel(state[1:], after)
