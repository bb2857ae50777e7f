"""LongHeads (arXiv:2402.10685): each head attends causally to its first, previous and own chunk plus
the chunks whose summary key (two-stage attention pooling over the chunk) best matches its query,
`top_k` chunks in all, so a head never attends to more than top_k · chunk_size keys.

Checked against a float64 numpy rewrite of the authors' `modeling_longheads/modeling_llama.py`
(in-chunk attention, mean, pooling of the chunk's keys, forced chunks filled with +max, `topk`, then
one causal softmax over the selected chunks), with summary="values" (their exact form, h == H) and
the default summary="keys" (h != H), per head with GQA and with padding; the claims: top_k covering
every chunk is full causal attention, each row attends to exactly min(top_k, c + 1) chunks (never
more than top_k · chunk_size keys) and rows before top_k · chunk_size are full causal attention; a
hand-built case whose retrieved chunk is known; the fast path's gradients against the reference's;
and the clear errors.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.core import flex
from attnjax.ops.sparse import longheads
from tests import inputs
from tests import numpy_math
from tests import tolerances

B, T, N, K, H, HV = 2, 19, 4, 2, 8, 6
W, TOP = 4, 4
NB = -(-T // W)


def _softmax_rows(s):
  e = np.exp(s - s.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _longheads_numpy(q, k, v, *, w, top_k, summary, kv_lengths=None):
  """float64 rewrite of the authors' prefill (per batch row and head; GQA by head groups)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b_, t_, n_, h_ = q.shape
  kh = k.shape[2]
  scale = h_ ** -0.5
  nb = -(-t_ // w)
  lengths = np.full(b_, t_) if kv_lengths is None else np.asarray(kv_lengths)
  out = np.zeros((b_, t_, n_, v.shape[-1]))
  for b in range(b_):
    for n in range(n_):
      qq, kk, vv = q[b, :, n], k[b, :, n // (n_ // kh)], v[b, :, n // (n_ // kh)]
      xx = kk if summary == "keys" else vv
      r = np.zeros((nb, h_))
      for c in range(nb):
        idx = np.arange(c * w, min((c + 1) * w, lengths[b]))
        if idx.size:
          o = _softmax_rows(scale * qq[idx] @ kk[idx].T) @ xx[idx]      # in-chunk attention
          r[c] = _softmax_rows(scale * o.mean(0) @ kk[idx].T) @ kk[idx]  # pooled chunk key
      for t in range(t_):
        c = t // w
        gate = r @ qq[t]
        future = (np.arange(nb) > c) | (np.arange(nb) * w >= lengths[b])
        gate[future] = -np.inf
        for j in {0, max(c - 1, 0), c}:
          if not future[j]:
            gate[j] = np.inf
        chosen = [j for j in np.argsort(-gate, kind="stable")[:top_k] if gate[j] > -np.inf]
        keys = np.isin(np.arange(t_) // w, chosen) & (np.arange(t_) <= t) & (np.arange(t_) < lengths[b])
        out[b, t, n] = numpy_math.softmax(scale * kk @ qq[t], where=keys) @ vv
  return out


@pytest.mark.parametrize("summary,hv", [("keys", HV), ("values", H)])
def test_matches_numpy_rewrite_of_the_authors_code(summary, hv):
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=hv, seed=1)
  lengths = jnp.array([T, 14])
  want = _longheads_numpy(q, k, v, w=W, top_k=TOP, summary=summary, kv_lengths=lengths)
  for impl in ("xla", "reference"):
    fn = inputs.jit_with(longheads.longheads_attention, chunk_size=W, top_k=TOP, summary=summary,
                         implementation=impl)
    got = np.asarray(fn(q, k, v, kv_lengths=lengths))
    # Queries at or past a row's length are padding: not compared.
    for b, length in enumerate(np.asarray(lengths)):
      np.testing.assert_allclose(got[b, :length], want[b, :length], err_msg=f"{summary} {impl}",
                                 **tolerances.output(jnp.float32))


def test_top_k_covering_every_chunk_is_full_causal_attention():
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=HV, seed=2)
  want = inputs.jit_with(flex.flex_attention, mask_mod=lambda b, n, i, j: i >= j,
                         implementation="reference")(q, k, v)
  got = inputs.jit_with(longheads.longheads_attention, chunk_size=W, top_k=NB)(q, k, v)
  np.testing.assert_allclose(got, want, **tolerances.output(jnp.float32))
  sparse_out = np.asarray(inputs.jit_with(longheads.longheads_attention, chunk_size=W, top_k=TOP)(
      q, k, v))
  # Rows before top_k · chunk_size see every earlier chunk (the authors' plain attention before
  # begin_selective_length); later rows are sparse.
  np.testing.assert_allclose(sparse_out[:, :TOP * W], np.asarray(want)[:, :TOP * W],
                             **tolerances.output(jnp.float32))
  assert tolerances.rel_rms(sparse_out[:, TOP * W:], np.asarray(want)[:, TOP * W:]) > \
      tolerances.CHANGED_REL_RMS


def test_each_head_attends_within_top_k_chunks():
  """The paper's "within the pretrained length": every row selects exactly min(top_k, c + 1) chunks
  including chunks 0, c - 1 and c, so it attends to at most top_k · chunk_size keys."""
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=HV, seed=3)
  top_k = 3
  selected = np.asarray(inputs.jit_with(longheads.longheads_selection, chunk_size=W, top_k=top_k)(
      q, k, v))
  own = np.arange(T) // W
  np.testing.assert_array_equal(selected.sum(-1), np.broadcast_to(np.minimum(top_k, own + 1),
                                                                   (B, N, T)))
  rows = np.arange(T)
  for chunk in (np.zeros(T, int), np.maximum(own - 1, 0), own):
    assert selected[:, :, rows, chunk].all()
  keys = np.repeat(selected, W, axis=-1)[..., :T] & (np.arange(T)[None, :] <= rows[:, None])
  assert keys.sum(-1).max() <= top_k * W


def test_hand_built_example_retrieves_the_matching_chunk():
  """Chunk 2's keys point along e0, chunk 1's along e1: the last query (chunk 4, forced 0, 3, 4)
  retrieves chunk 2 when it points along e0 and chunk 1 when it points along e1."""
  t, h = 20, 2
  k = np.zeros((1, t, 1, h), np.float32)
  k[0, :, 0, 1] = 0.5
  k[0, 4:8, 0] = [0.0, 2.0]
  k[0, 8:12, 0] = [3.0, 0.0]
  v = np.random.default_rng(0).standard_normal((1, t, 1, 3)).astype(np.float32)
  q = np.zeros((1, t, 1, h), np.float32)
  q[0, 19, 0] = [1.0, 0.0]
  q[0, 18, 0] = [0.0, 1.0]
  selected = np.asarray(inputs.jit_with(longheads.longheads_selection, chunk_size=4, top_k=4)(
      q, k, v))
  np.testing.assert_array_equal(selected[0, 0, 19], [True, False, True, True, True])
  np.testing.assert_array_equal(selected[0, 0, 18], [True, True, False, True, True])
  out = inputs.jit_with(longheads.longheads_attention, chunk_size=4, top_k=4)(q, k, v)
  keys = np.r_[0:4, 8:20]
  w = numpy_math.softmax(k[0, keys, 0].astype(np.float64) @ q[0, 19, 0] * h ** -0.5)
  np.testing.assert_allclose(out[0, 19, 0], w @ v[0, keys, 0], **tolerances.output(jnp.float32))


def test_fast_path_gradients_match_the_reference():
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=HV, seed=4)
  dout = np.random.default_rng(5).standard_normal((B, T, N, HV)).astype(np.float32)
  kw = dict(chunk_size=W, top_k=TOP)
  inputs.assert_same_gradients(
      lambda *a: longheads.longheads_attention(*a, **kw, implementation="xla"),
      lambda *a: longheads.longheads_attention(*a, **kw, implementation="reference"),
      (q, k, v), dout, ("dq", "dk", "dv"), tol=tolerances.grad(jnp.float32))


def test_clear_errors():
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=HV)
  fn = longheads.longheads_attention
  with pytest.raises(ValueError, match="longheads_attention.*`v`'s head dim"):
    fn(q, k, v, summary="values", chunk_size=W)
  with pytest.raises(ValueError, match="longheads_attention.*causal"):
    fn(q, k, v, causal=False, chunk_size=W)
  with pytest.raises(ValueError, match="longheads_attention.*segment_ids"):
    fn(q, k, v, segment_ids=jnp.zeros((B, T), jnp.int32), chunk_size=W)
  with pytest.raises(ValueError, match="longheads_attention.*KV cache"):
    fn(q[:, -1:], k, v, q_offset=T - 1, kv_lengths=jnp.full((B,), T), chunk_size=W)
  with pytest.raises(ValueError, match="longheads_attention.*top_k"):
    fn(q, k, v, chunk_size=W, top_k=2)
