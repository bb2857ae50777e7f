"""Twins-SVT's LSA and GSA (arXiv:2104.13840).

Defining properties: LSA is softmax attention inside non-overlapping groups of the map (float64
rewrite of Twins' GroupAttention: partition, attend per group); GSA is attention from every query to
one strided-convolution summary per sr x sr window (float64 rewrite: zero-pad the map, one
`Σ_p W_p x_p` per window and key/value head, then softmax attention), on 2-D maps (ragged sides
included) and 1-D, with GQA, both implementations, gradients of the xla path against the reference
(the kernels' included). The catalog's claim "cost linear in H·W for a fixed window": the tiles the
xla path visits for LSA double when the map's height doubles, where full attention's quadruple.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.core import block_mask
from attnjax.core import windows
from attnjax.ops.local import twins
from tests import inputs
from tests import numpy_math
from tests import tolerances

F32 = jnp.float32


def _attend(q, k, v, keep=None):
  logits = np.einsum("bqnh,bknh->bnqk", q, k) * q.shape[-1] ** -0.5
  return np.einsum("bnqk,bknh->bqnh", numpy_math.softmax(logits, where=keep), v)


def _groups(shape, ws):
  """Flat token indices of each window, and each window's row-major offsets (p) of its tokens."""
  shape = tuple(shape) if len(shape) == 2 else (1,) + tuple(shape)
  ws = tuple(ws) if len(ws) == 2 else (1,) + tuple(ws)
  idx = np.arange(np.prod(shape)).reshape(shape)
  out = []
  for i in range(0, shape[0], ws[0]):
    for j in range(0, shape[1], ws[1]):
      rows, cols = np.meshgrid(np.arange(i, min(i + ws[0], shape[0])),
                               np.arange(j, min(j + ws[1], shape[1])), indexing="ij")
      out.append((idx[rows, cols].ravel(), ((rows - i) * ws[1] + cols - j).ravel()))
  return out


def _expand(x, N):
  return np.repeat(np.asarray(x, np.float64), N // x.shape[2], axis=2)


@pytest.mark.parametrize("shape,ws", [((5, 7), (2, 3)), ((19,), (4,))])
def test_lsa_is_attention_inside_each_group(shape, ws):
  L = int(np.prod(shape))
  q, k, v = inputs.qkv(B=2, T=L, N=4, K=2, H=8, h=6, seed=1)
  q64, k64, v64 = np.asarray(q, np.float64), _expand(k, 4), _expand(v, 4)
  want = np.zeros((2, L, 4, 6))
  for w, _ in _groups(shape, ws):
    want[:, w] = _attend(q64[:, w], k64[:, w], v64[:, w])
  for impl in ("xla", "reference"):
    fn = inputs.jit_with(twins.twins_lsa_attention, window_size=ws, spatial_shape=shape,
                         implementation=impl)
    np.testing.assert_allclose(fn(q, k, v), want, **tolerances.output(F32))


def _gsa_numpy(q, k, v, shape, sr, wk, wv):
  N = q.shape[2]
  keys, values = [], []
  for w, p in _groups(shape, sr):
    # one strided-conv output per window and key/value head: Σ_p x_p W_p (missing offsets are zero)
    keys.append(np.einsum("bpkd,pkde->bke", np.asarray(k, np.float64)[:, w],
                          np.asarray(wk, np.float64)[p]))
    values.append(np.einsum("bpkd,pkde->bke", np.asarray(v, np.float64)[:, w],
                            np.asarray(wv, np.float64)[p]))
  keys, values = np.stack(keys, 1), np.stack(values, 1)
  return _attend(np.asarray(q, np.float64), _expand(keys, N), _expand(values, N))


@pytest.mark.parametrize("shape,sr", [((6, 5), 2), ((19,), 4)])
def test_gsa_attends_to_strided_conv_summaries(shape, sr):
  L = int(np.prod(shape))
  P = sr ** len(shape)
  q, k, v = inputs.qkv(B=2, T=L, N=4, K=2, H=8, h=6, seed=2)
  wk = jax.random.normal(jax.random.PRNGKey(3), (P, 2, 8, 8)) * 0.3
  wv = jax.random.normal(jax.random.PRNGKey(4), (P, 2, 6, 6)) * 0.3
  want = _gsa_numpy(q, k, v, shape, (sr,) * len(shape), wk, wv)
  for impl in ("xla", "reference"):
    fn = inputs.jit_with(twins.twins_gsa_attention, spatial_shape=shape, implementation=impl)
    np.testing.assert_allclose(fn(q, k, v, reduction_k=wk, reduction_v=wv), want,
                               **tolerances.output(F32))
  dout = jax.random.normal(jax.random.PRNGKey(5), (2, L, 4, 6))
  fn = lambda impl: lambda q, k, v, wk, wv: twins.twins_gsa_attention(
      q, k, v, reduction_k=wk, reduction_v=wv, spatial_shape=shape, implementation=impl)
  inputs.assert_same_gradients(fn("xla"), fn("reference"), (q, k, v, wk, wv), dout,
                               ("dq", "dk", "dv", "dreduction_k", "dreduction_v"),
                               tol=tolerances.grad(F32))


def test_lsa_visited_tiles_grow_linearly_with_the_map():
  def tiles(rows, mask=True):
    shape, L = (rows, 16), rows * 16
    mod = windows.window_mask(shape, (4, 4), (0, 0)) if mask else None
    mod = mod or (lambda b, n, q_idx, kv_idx: q_idx >= 0)
    bm = block_mask.create_block_mask(mod, 1, 1, L, L, block_q=16, block_kv=16)
    return int(np.asarray(bm.kv_num_blocks).sum() + np.asarray(bm.full_kv_num_blocks).sum())
  assert tiles(16) == 2 * tiles(8)
  assert tiles(16, mask=False) == 4 * tiles(8, mask=False)


def test_bad_kernels_are_clear_errors():
  q, k, v = inputs.qkv(B=1, T=12, N=4, K=2, H=8, h=6)
  wk, wv = jnp.zeros((3, 2, 8, 8)), jnp.zeros((3, 2, 6, 6))
  with pytest.raises(ValueError, match="twins_gsa_attention: `reduction_k` has P = 3"):
    twins.twins_gsa_attention(q, k, v, reduction_k=wk, reduction_v=wv, spatial_shape=(3, 4))
  with pytest.raises(ValueError, match="twins_gsa_attention: .*reduction_v"):
    twins.twins_gsa_attention(q, k, v, reduction_k=wk, reduction_v=wv[..., :4], sr=3)
