"""Multi-Token Attention (#76): softmax between masked key-query convolutions of the logits and the
weights (c_q queries back, c_k keys centred) and head mixing within groups, checked against a float64
rewrite that loops over every kernel tap (random kernels, all four parts, grouped head mixing, GQA,
causal and bidirectional, packed documents), and its defining properties: identity kernels and head
mixing are exactly softmax attention (the released models' initialization), a weight depends on the
neighbouring queries' and keys' logits (which softmax's cannot), and no hidden key leaks in."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops.softmax import multi_token_attention, softmax_attention
from attnjax.ops.softmax.multi_token import identity_head_mix, identity_qk_kernel
from tests import inputs
from tests import tolerances

F32 = tolerances.output(jnp.float32)
B, T, N, K, H, h = 2, 11, 4, 2, 8, 6
CQ, CK = 3, 5


def _conv64(x, kernel, seg):
  """Conv_θ over `x [N, T, S]` by explicit taps: rows i - (c_q - 1) + a of row i's document, keys
  j - (c_k - 1)/2 + b inside the sequence, zeros elsewhere."""
  n_heads, Tq, S = x.shape
  cq, ck = kernel.shape[1:]
  out = np.zeros_like(x)
  for n in range(n_heads):
    for i in range(Tq):
      for j in range(S):
        for a in range(cq):
          for b in range(ck):
            r, c = i - (cq - 1) + a, j - (ck - 1) // 2 + b
            if 0 <= r and 0 <= c < S and seg[r] == seg[i]:
              out[n, i, j] += kernel[n, a, b] * x[n, r, c]
  return out


def _mix64(x, mix):
  G = mix.shape[1]
  out = np.zeros_like(x)
  for g in range(mix.shape[0]):
    for o in range(G):
      for hh in range(G):
        out[g * G + o] += mix[g, hh, o] * x[g * G + hh]
  return out


def _mta_float64(q, k, v, arrays, *, causal, seg=None, scale):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  a = {key: np.asarray(x, np.float64) for key, x in arrays.items()}
  G = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
  Tq, S = q.shape[1], k.shape[1]
  out = np.zeros(q.shape[:3] + (v.shape[3],))
  for b in range(q.shape[0]):
    sb = np.zeros(Tq, int) if seg is None else np.asarray(seg[b])
    visible = np.tril(np.ones((Tq, S), bool)) if causal else np.ones((Tq, S), bool)
    if seg is not None:
      visible &= sb[:, None] == sb[None, :]
    logits = np.einsum("tnh,snh->nts", q[b], k[b]) * scale
    x = _conv64(np.where(visible, logits, 0.0), a["qk_kernel"], sb)
    if "pre_head_mix" in a:
      x = _mix64(x, a["pre_head_mix"])
    x = np.where(visible, x, -np.inf)
    w = np.exp(x - x.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    if "post_qk_kernel" in a:
      w = np.where(visible, _conv64(w, a["post_qk_kernel"], sb), 0.0)
    w = _mix64(w, a["head_mix"])
    out[b] = np.einsum("nts,snh->tnh", w, v[b])
  return out


def _arrays(seed, *, groups=2):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  G = N // groups
  eye = lambda shape: identity_head_mix(None, shape)
  return {
      "qk_kernel": identity_qk_kernel(None, (N, CQ, CK)) + 0.3 * jax.random.normal(keys[0], (N, CQ, CK)),
      "post_qk_kernel": (identity_qk_kernel(None, (N, CQ + 1, CK - 2))
                         + 0.3 * jax.random.normal(keys[1], (N, CQ + 1, CK - 2))),
      "pre_head_mix": eye((1, N, N)) + 0.3 * jax.random.normal(keys[2], (1, N, N)),
      "head_mix": eye((groups, G, G)) + 0.3 * jax.random.normal(keys[3], (groups, G, G)),
  }


@pytest.mark.parametrize("causal", [False, True])
def test_equals_the_papers_equations(causal):
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h, seed=1)
  arrays = _arrays(2)
  out = inputs.jit_with(multi_token_attention, causal=causal)(q, k, v, **arrays)
  np.testing.assert_allclose(np.asarray(out), _mta_float64(q, k, v, arrays, causal=causal,
                                                           scale=H ** -0.5), **F32)


def test_pre_softmax_parts_alone_and_packed_documents():
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h, seed=3)
  arrays = {key: x for key, x in _arrays(4, groups=4).items()
            if key in ("qk_kernel", "head_mix")}
  seg = jnp.array([[0] * 5 + [1] * 6, [0] * 8 + [1] * 3])
  out = multi_token_attention(q, k, v, causal=True, segment_ids=seg, **arrays)
  want = _mta_float64(q, k, v, arrays, causal=True, seg=seg, scale=H ** -0.5)
  np.testing.assert_allclose(np.asarray(out), want, **F32)


@pytest.mark.parametrize("causal", [False, True])
def test_identity_kernels_and_head_mixing_are_softmax(causal):
  q, k, v = inputs.qkv(B=B, T=T, S=T + 3 * (not causal), N=N, K=K, H=H, h=h, seed=5)
  arrays = {"qk_kernel": identity_qk_kernel(None, (N, 6, 11)),
            "post_qk_kernel": identity_qk_kernel(None, (N, 6, 11)),
            "pre_head_mix": identity_head_mix(None, (1, N, N)),
            "head_mix": identity_head_mix(None, (2, 2, 2))}
  out = multi_token_attention(q, k, v, causal=causal, **arrays)
  want = softmax_attention(q, k, v, causal=causal)
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), **F32)


def test_weights_depend_on_neighbouring_queries_and_keys():
  # One-hot values make the output rows the weight rows (identity head mixing: one head each).
  # Softmax's row 6 ignores query 4, and its ratio w_94 / w_90 ignores key 5; MTA's do not (query
  # taps reach 2 rows back, key taps 2 keys aside), while the rows before the changed query stay put.
  q, k, _ = inputs.qkv(B=1, T=T, N=N, K=K, H=H, seed=6)
  v = jnp.broadcast_to(jnp.eye(T)[None, :, None, :], (1, T, K, T))
  arrays = {"qk_kernel": _arrays(7)["qk_kernel"], "head_mix": identity_head_mix(None, (1, N, N))}
  w = lambda q, k: np.asarray(multi_token_attention(q, k, v, causal=True, **arrays), np.float64)
  base = w(q, k)
  moved_q = w(q.at[:, 4].multiply(-3.0), k)
  assert np.abs(moved_q[0, 6] - base[0, 6]).max() > tolerances.CHANGED_MAX_ABS
  np.testing.assert_allclose(moved_q[0, :4], base[0, :4], **F32)      # causal in the query axis
  moved_k = w(q, k.at[:, 5].multiply(-3.0))
  ratio = lambda x: np.log(x[0, 9, :, 4]) - np.log(x[0, 9, :, 0])
  assert np.abs(ratio(moved_k) - ratio(base)).max() > tolerances.CHANGED_MAX_ABS


def test_no_hidden_key_leaks_in():
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h, seed=8)
  arrays = _arrays(9)
  out = multi_token_attention(q, k, v, causal=True, kv_lengths=jnp.array([7, 11]), **arrays)
  garbage = lambda x: x.at[0, 7:].set(1e4)
  out2 = multi_token_attention(q, garbage(k), garbage(v), causal=True,
                               kv_lengths=jnp.array([7, 11]), **arrays)
  np.testing.assert_allclose(np.asarray(out2), np.asarray(out), **F32)
  empty = multi_token_attention(q, k, v, kv_lengths=jnp.array([0, 11]), **arrays)
  np.testing.assert_array_equal(np.asarray(empty[0]), 0.0)


def test_bad_input_is_a_clear_error():
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h)
  arrays = _arrays(0)
  with pytest.raises(ValueError, match=r"multi_token_attention.*qk_kernel.*odd"):
    multi_token_attention(q, k, v, **{**arrays, "qk_kernel": jnp.zeros((N, 3, 4))})
  with pytest.raises(ValueError, match=r"multi_token_attention.*head_mix.*\[N/G, G, G\]"):
    multi_token_attention(q, k, v, **{**arrays, "head_mix": jnp.zeros((1, 3, 3))})
  with pytest.raises(ValueError, match=r"multi_token_attention.*q_offset"):
    multi_token_attention(q[:, :1], k, v, q_offset=3, kv_lengths=jnp.full((B,), 4), **arrays)
  with pytest.raises(ValueError, match="unknown implementation"):
    multi_token_attention(q, k, v, implementation="xla", **arrays)
