"""Delta Attention (arXiv:2505.11254): sparse attention for every query plus, for each group of
`gamma` queries, the dense-minus-sparse output difference of its first (anchor) row.

Checked against a float64 numpy rewrite of the authors' `delta_forward` (strided anchors
`arange(0, s, γ)`, `repeat_interleave` of the differences) over sliding window + sinks, causal and
not, with GQA, padding and a query block at an offset; the paper's exactness (anchor rows equal dense
attention; gamma = 1 equals dense), the correction over another registered mechanism by name, the
dense tail, document-relative anchors, the fast path's gradients against the reference's, and the
claim the correction serves: with queries that vary slowly within a group (the paper's premise) it
brings the sparse output much closer to dense attention.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops.sparse import delta
from tests import inputs
from tests import numpy_math
from tests import tolerances

B, T, N, K, H, HV = 2, 13, 4, 2, 8, 6
WINDOW, SINKS, GAMMA = 3, 2, 4


def _attend(q, k, v, keep, scale):
  """float64 softmax attention per head with `keep [B, N, T, S]` (empty rows give zeros)."""
  n_, kh = q.shape[2], k.shape[2]
  kk = np.repeat(k, n_ // kh, axis=2)
  vv = np.repeat(v, n_ // kh, axis=2)
  s = scale * np.einsum("btnh,bsnh->bnts", q, kk)
  w = numpy_math.softmax(s, where=keep)
  w = np.where(keep.any(-1, keepdims=True), w, 0.0)
  return np.einsum("bnts,bsnh->btnh", w, vv)


def _delta_numpy(q, k, v, *, window, num_sinks, gamma, causal, q_offset=0, kv_lengths=None,
                 segments=None, dense_last=0, sparse_keep=None):
  """float64 Delta correction over sliding window + sinks (or `sparse_keep`), the authors' rule."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b_, t_, _, h_ = q.shape
  s_ = k.shape[1]
  pos = q_offset + np.arange(t_)
  j = np.arange(s_)
  keep = np.ones((b_, 1, t_, s_), bool)
  if causal:
    keep &= (j[None, :] <= pos[:, None])[None, None]
  if kv_lengths is not None:
    keep &= (j < np.asarray(kv_lengths)[:, None])[:, None, None, :]
  starts = np.zeros((b_, t_), int)
  if segments is not None:
    seg = np.asarray(segments)
    keep &= (seg[:, :, None] == seg[:, None, :])[:, None]
    for b in range(b_):
      for t in range(t_):
        starts[b, t] = min(i for i in range(t + 1) if seg[b, i] == seg[b, t])
  if sparse_keep is None:
    key_start = starts if segments is not None else np.zeros((b_, s_), int)
    sinks = (j[None, :] - key_start) < num_sinks                                   # [B, S]
    near = np.abs(pos[:, None] - j[None, :]) < window                              # [T, S]
    sparse_keep = sinks[:, None, None, :] | near[None, None]
  scale = h_ ** -0.5
  o_sparse = _attend(q, k, v, keep & sparse_keep, scale)
  o_dense = _attend(q, k, v, keep, scale)
  out = np.empty_like(o_sparse)
  for b in range(b_):
    for t in range(t_):
      a = starts[b, t] + ((t - starts[b, t]) // gamma) * gamma
      if t >= t_ - dense_last:
        a = t
      out[b, t] = o_sparse[b, t] + o_dense[b, a] - o_sparse[b, a]
  return out, o_sparse, o_dense


CASES = {
    "causal": dict(causal=True),
    "bidirectional": dict(causal=False),
    "padded": dict(causal=True, kv_lengths=(13, 9)),
    "offset_block": dict(causal=True, t=6, q_offset=7, kv_lengths=(13, 11)),
}


@pytest.mark.parametrize("case,implementation",
                         [(case, "xla") for case in CASES]
                         + [("bidirectional", "reference"), ("offset_block", "reference")])
def test_matches_float64_rewrite_of_the_authors_rule(case, implementation):
  spec = dict(CASES[case])
  t = spec.pop("t", T)
  q, k, v = inputs.qkv(B=B, T=t, S=T, N=N, K=K, H=H, h=HV, seed=1)
  lengths = spec.get("kv_lengths")
  kwargs = dict(causal=spec["causal"], q_offset=spec.get("q_offset", 0),
                kv_lengths=None if lengths is None else jnp.asarray(lengths))
  fn = inputs.jit_with(delta.delta_corrected_sliding_window, window=WINDOW, num_sinks=SINKS,
                       gamma=GAMMA, implementation=implementation, **kwargs)
  got = fn(q, k, v)
  want, _, _ = _delta_numpy(q, k, v, window=WINDOW, num_sinks=SINKS, gamma=GAMMA, **spec)
  np.testing.assert_allclose(got, want, **tolerances.output(jnp.float32))


def test_anchor_rows_are_dense_and_gamma_one_is_dense_attention():
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=HV, seed=2)
  _, o_sparse, o_dense = _delta_numpy(q, k, v, window=WINDOW, num_sinks=SINKS, gamma=GAMMA,
                                      causal=True)
  got = inputs.jit_with(delta.delta_corrected_sliding_window, window=WINDOW, num_sinks=SINKS,
                       gamma=GAMMA, causal=True)(q, k, v)
  anchors = np.arange(0, T, GAMMA)
  np.testing.assert_allclose(got[:, anchors], o_dense[:, anchors], **tolerances.output(jnp.float32))
  # The window really is sparse here: other rows are not dense attention.
  assert tolerances.rel_rms(o_sparse, o_dense) > tolerances.STRONG_CHANGE_REL_RMS
  every = inputs.jit_with(delta.delta_corrected_sliding_window, window=WINDOW, num_sinks=SINKS,
                         gamma=1, causal=True)(q, k, v)
  np.testing.assert_allclose(every, o_dense, **tolerances.output(jnp.float32))


def test_correction_over_a_registered_mechanism_by_name_and_dense_tail():
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=HV, seed=3)
  got = jax.jit(lambda *a: delta.delta_corrected_attention(
      *a, sparse="sliding_window", gamma=GAMMA, sparse_kwargs=dict(window=WINDOW), causal=True,
      dense_last=3))(q, k, v)
  j = np.arange(T)
  window_only = (np.abs(j[:, None] - j[None, :]) < WINDOW)[None, None]
  want, _, _ = _delta_numpy(q, k, v, window=WINDOW, num_sinks=0, gamma=GAMMA, causal=True,
                            dense_last=3, sparse_keep=window_only)
  np.testing.assert_allclose(got, want, **tolerances.output(jnp.float32))


def test_anchors_restart_at_each_packed_document():
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=HV, seed=4)
  seg = jnp.asarray([[0] * 6 + [1] * 7, [0] * 3 + [1] * 10])
  got = inputs.jit_with(delta.delta_corrected_sliding_window, window=WINDOW, num_sinks=SINKS,
                       gamma=GAMMA, causal=True)(q, k, v, segment_ids=seg)
  want, _, _ = _delta_numpy(q, k, v, window=WINDOW, num_sinks=SINKS, gamma=GAMMA, causal=True,
                            segments=seg)
  np.testing.assert_allclose(got, want, **tolerances.output(jnp.float32))


def test_fast_path_gradients_match_the_reference():
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=HV, seed=5)
  dout = jax.random.normal(jax.random.PRNGKey(6), (B, T, N, HV))
  fns = [inputs.jit_with(delta.delta_corrected_sliding_window, window=WINDOW, num_sinks=SINKS,
                         gamma=GAMMA, causal=True, implementation=impl)
         for impl in ("xla", "reference")]
  inputs.assert_same_gradients(*fns, (q, k, v), dout, ("dq", "dk", "dv"),
                               tol=tolerances.grad(jnp.float32))


def test_correction_brings_slowly_varying_queries_close_to_dense():
  """The paper's premise: neighbouring queries see nearly the same keys, so the dense-minus-sparse
  difference of an anchor transfers to its group. Queries = a shared direction per group plus small
  noise, a window that covers a third of the keys: the corrected output is far closer to dense
  attention than the window with sinks alone."""
  t, window, gamma = 24, 8, 2
  q, k, v = inputs.qkv(B=B, T=t, N=N, K=K, H=H, h=HV, seed=7)
  q = 2.0 * jnp.repeat(q[:, ::gamma], gamma, axis=1)[:, :t] + 0.05 * q
  _, o_sparse, o_dense = _delta_numpy(q, k, v, window=window, num_sinks=SINKS, gamma=gamma,
                                      causal=True)
  got = inputs.jit_with(delta.delta_corrected_sliding_window, window=window, num_sinks=SINKS,
                       gamma=gamma, causal=True)(q, k, v)
  sparse_error = tolerances.rel_rms(o_sparse, o_dense)
  corrected_error = tolerances.rel_rms(got, o_dense)
  assert corrected_error < tolerances.DELTA_CORRECTION_ERROR_RATIO_MAX * sparse_error, (
      corrected_error, sparse_error)


def test_bad_arguments_name_the_operator():
  q, k, v = inputs.qkv(B=1, T=5, N=2, K=2, H=4, h=4)
  with pytest.raises(ValueError, match="delta_corrected_sliding_window: `gamma`"):
    delta.delta_corrected_sliding_window(q, k, v, window=2, gamma=0)
  with pytest.raises(ValueError, match="delta_corrected_attention: `sparse`"):
    delta.delta_corrected_attention(q, k, v, sparse=3, gamma=2)
