"""Selective attention (#132): every head's causal logits minus F, the selection head's (head 0's)
ReLU logits accumulated over earlier queries, with the BOS and each token itself never masked.
Checked against a float64 rewrite of the paper's Figure 1 code (relu, zero BOS column, zero diagonal,
roll down one query, cumsum over queries) in both implementations, and its defining properties:
with a selection head whose logits are all <= 0 it is causal softmax; the BOS is never penalized
however strongly it is selected; a selected key is masked only for queries after the selecting one."""

import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax.ops.softmax import selective_attention_masking, softmax_attention
from attnjax.ops.softmax.selective_masking import selection_penalty
from tests import inputs
from tests import tolerances

F32 = tolerances.output(jnp.float32)
B, T, N, K, H, h = 2, 13, 4, 2, 8, 6


def _selective_float64(q, k, v, *, scale):
  """The paper's Figure 1 code, in float64 numpy, per batch row."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  G = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
  C = q.shape[1]
  causal = np.tril(np.ones((C, C), bool))
  out = np.zeros(q.shape[:3] + (v.shape[3],))
  for b in range(q.shape[0]):
    logits = np.einsum("tnh,snh->nts", q[b], k[b]) * scale
    logits = np.where(causal, logits, -np.inf)
    sel = np.maximum(logits[0], 0.0)            # relu of head 0 (relu(-inf) = 0)
    sel[:, 0] = 0.0                             # do not mask the BOS
    sel = (1.0 - np.eye(C)) * sel               # do not mask self
    sel = np.roll(sel, 1, axis=0)               # mask strictly in the future
    sel[0, :] = 0.0
    F = np.cumsum(sel, axis=0)
    z = logits - F[None]
    w = np.exp(z - z.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    out[b] = np.einsum("nts,snh->tnh", w, v[b])
  return out


@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_equals_the_papers_code(implementation):
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h, seed=1)
  q = q.at[:, :, 0].multiply(2.0)                 # a selection head with large positive logits too
  out = inputs.jit_with(selective_attention_masking, implementation=implementation)(q, k, v)
  np.testing.assert_allclose(np.asarray(out), _selective_float64(q, k, v, scale=H ** -0.5), **F32)
  assert np.abs(np.asarray(selection_penalty(q, k))).max() > 1.0      # F is not negligible here


@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_a_selection_head_with_no_positive_logit_is_causal_softmax(implementation):
  # Positive keys and a negative query for head 0 (key head 0): all its logits are < 0, S = 0.
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h, seed=2)
  k = k.at[:, :, 0].set(jnp.abs(k[:, :, 0]))
  q = q.at[:, :, 0].set(-jnp.abs(q[:, :, 0]))
  out = selective_attention_masking(q, k, v, implementation=implementation)
  want = softmax_attention(q, k, v, causal=True, implementation=implementation)
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), **F32)


def test_bos_is_never_masked_and_masking_starts_after_the_selecting_query():
  # Every key of head 0 along the selection query direction: S_kj > 0 for every j < k, the BOS too.
  q, k, _ = inputs.qkv(B=1, T=T, N=2, K=1, H=4, h=3, seed=3)
  k = k.at[:, :, 0].set(jnp.abs(k[:, :, 0]) + 1.0)
  q = q.at[:, :, 0].set(jnp.abs(q[:, :, 0]) + 1.0)
  F = np.asarray(selection_penalty(q, k))[0]
  np.testing.assert_array_equal(F[:, 0], 0.0)                       # the BOS column
  np.testing.assert_array_equal(F[np.triu_indices(T, -1)], 0.0)     # j >= i - 1: no earlier selector
  i, j = np.tril_indices(T, -2)
  assert np.all(F[i[j > 0], j[j > 0]] > 0.0)                        # 1 <= j <= i - 2: masked
  assert np.all(np.diff(F, axis=0) >= 0.0)                          # only accumulates


def test_packed_documents_each_start_with_a_bos():
  q, k, v = inputs.qkv(B=1, T=T, N=N, K=K, H=H, h=h, seed=4)
  seg = jnp.array([[0] * 6 + [1] * 7])
  F = np.asarray(selection_penalty(q, k, segment_ids=seg))[0]
  np.testing.assert_array_equal(F[:, 6], 0.0)                       # second document's first token
  np.testing.assert_array_equal(F[6:, :6], 0.0)                     # nothing crosses documents
  packed = selective_attention_masking(q, k, v, segment_ids=seg)
  second = selective_attention_masking(q[:, 6:], k[:, 6:], v[:, 6:])
  np.testing.assert_allclose(np.asarray(packed[:, 6:]), np.asarray(second), **F32)


def test_unsupported_calls_are_clear_errors():
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h)
  with pytest.raises(ValueError, match="selective_attention_masking.*causal"):
    selective_attention_masking(q, k, v, causal=False)
  with pytest.raises(ValueError, match="selective_attention_masking.*every query"):
    selective_attention_masking(q[:, 5:6], k, v, q_offset=5, kv_lengths=jnp.full((B,), 6))
  mech = aj.get_mechanism("selective_attention_masking")
  assert not mech.decode and mech.patterns == frozenset({"causal_self"}) and not mech.params
