"""GAU attention (#226): weights relu(q·k / n_i + b)² with n_i the number of keys query i sees.

Checked against a float64 numpy rewrite on both flex paths (GQA, padding, packed documents, the
relative bias, a fixed n, the softmax alternative of Mega/TacoLM), and the defining property of the
1/n factor: with every key (and its value) duplicated, each weight falls to a quarter (the scores
halve before squaring) while the number of terms doubles, so the output halves exactly; softmax
attention would not change at all.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops.softmax import gau
from tests import inputs
from tests import tolerances

F32 = tolerances.output(jnp.float32)
B, T, S, N, K, H, h, L = 2, 9, 13, 4, 2, 8, 6, 5
# Compiled (eager dispatch of the chunked path is several times slower); settings static.
gated_attention_unit = jax.jit(gau.gated_attention_unit,
                               static_argnames=("causal", "implementation", "length", "activation"))


def _gau_float64(q, k, v, *, causal=False, kv_lengths=None, segments=None, length=None,
                 bias=None, q_offset=0, activation="relu2"):
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  G = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
  s = np.einsum("btnh,bsnh->bnts", q, k)
  Tq, Sk = s.shape[-2:]
  pos = q_offset + np.arange(Tq)[:, None]
  visible = np.ones((q.shape[0], 1, Tq, Sk), bool)
  if causal:
    visible &= np.arange(Sk)[None, :] <= pos
  if kv_lengths is not None:
    visible &= (np.arange(Sk)[None, :] < np.asarray(kv_lengths)[:, None])[:, None, None]
  if segments is not None:
    seg = np.asarray(segments)
    visible &= (seg[:, :, None] == seg[:, None, :])[:, None]
  b = 0.0
  if bias is not None:
    rel = np.clip(np.arange(Sk)[None, :] - pos, -(L - 1), L - 1) + L - 1
    b = np.asarray(bias, np.float64)[rel]
  if activation == "softmax":
    logits = np.where(visible, s / np.sqrt(q.shape[-1]) + b, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
  else:
    n = visible.sum(-1, keepdims=True) if length is None else length
    w = np.where(visible, np.maximum(s / n + b, 0.0) ** 2, 0.0)
  return np.einsum("bnts,bsnh->btnh", w, v)


@pytest.mark.parametrize("implementation", ["xla", "reference"])
@pytest.mark.parametrize("case", ["bidirectional", "causal", "padded_cross", "packed", "fixed_n",
                                  "softmax"])
def test_equals_the_formula(case, implementation):
  cross = case == "padded_cross"
  q, k, v = inputs.qkv(B=B, T=T, S=S if cross else T, N=N, K=K, H=H, h=h, seed=3)
  bias = np.random.default_rng(0).standard_normal(2 * L - 1).astype(np.float32)
  kw = dict(causal=case in ("causal", "packed", "fixed_n"))
  if cross:
    kw["kv_lengths"] = jnp.array([S, 6])
  if case == "packed":
    kw["segment_ids"] = jnp.array([[0] * 4 + [1] * 5, [0] * 9])
  if case == "fixed_n":
    kw["length"] = 16
  if case == "softmax":
    kw["activation"] = "softmax"
  out = gated_attention_unit(q, k, v, relative_bias=bias, implementation=implementation, **kw)
  want = _gau_float64(q, k, v, bias=bias, segments=kw.pop("segment_ids", None), **kw)
  np.testing.assert_allclose(np.asarray(out), want, **F32)


def test_decode_rows_match_the_full_forward_and_empty_rows_give_zeros():
  """A block of queries at q_offset over a partly filled cache (garbage past the length) sees the
  keys up to its own position: row i still divides by i + 1."""
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h, seed=5)
  bias = np.random.default_rng(1).standard_normal(2 * L - 1).astype(np.float32)
  full = gated_attention_unit(q, k, v, causal=True, relative_bias=bias)
  k_cache = jnp.concatenate([k, 1e4 * jnp.ones_like(k[:, :3])], axis=1)
  v_cache = jnp.concatenate([v, 1e4 * jnp.ones_like(v[:, :3])], axis=1)
  part = gated_attention_unit(q[:, 5:], k_cache, v_cache, causal=True, relative_bias=bias,
                              q_offset=5, kv_lengths=jnp.full((B,), T))
  np.testing.assert_allclose(np.asarray(part), np.asarray(full[:, 5:]), **F32)
  empty = gated_attention_unit(q, k, v, kv_lengths=jnp.array([0, T]))
  np.testing.assert_array_equal(np.asarray(empty[0]), 0.0)
  grads = jax.grad(lambda q: jnp.sum(gated_attention_unit(q, k, v, kv_lengths=jnp.array([0, T]))))(q)
  assert np.isfinite(np.asarray(grads)).all()


def test_duplicating_every_key_halves_the_output():
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h, seed=7)
  twice = lambda a: jnp.concatenate([a, a], axis=1)
  once = gated_attention_unit(q, k, v)
  doubled = gated_attention_unit(q, twice(k), twice(v))
  np.testing.assert_allclose(np.asarray(doubled), np.asarray(once) / 2, **F32)
  soft = lambda k, v: gated_attention_unit(q, k, v, activation="softmax")
  np.testing.assert_allclose(np.asarray(soft(twice(k), twice(v))), np.asarray(soft(k, v)), **F32)


def test_bad_settings_name_the_argument():
  q, k, v = inputs.qkv(B=1, T=4, N=2, K=2, H=4, h=4)
  with pytest.raises(ValueError, match="relative_bias"):
    gated_attention_unit(q, k, v, relative_bias=jnp.zeros(4))
  with pytest.raises(ValueError, match="length"):
    gated_attention_unit(q, k, v, length=0)
  with pytest.raises(ValueError, match="activation"):
    gated_attention_unit(q, k, v, activation="laplace")
