"""Neighborhood attention: NA (#183), dilated NA (#154) and generalized NA (#121).

The papers' defining property is the window: every query attends to exactly k keys per grid axis, its
nearest neighbours (on its own residue class mod δ for DiNA), the window shifted -- not truncated -- at
the borders, and queries in a stride tile sharing their leader's window (GNA). The tests read the set of
keys each query sees off the operator itself (zero queries give equal weights, one-hot values give
the weights back) and compare it with a float64 numpy rewrite of NATTEN's window rule (the window
start of its CUDA NA / DiNA kernels, the stride-group leaders of its Flex mask); they check the claims
"kernel = map size is full self-attention", "stride = kernel is blocked attention" and "dilation δ
is NA on each δ-subsampled grid", and the relative position bias against a numpy einsum, gradients
included. 1-D, 2-D and 3-D maps of non-power-of-two sides, GQA, fp32.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops.local import neighborhood as nb
from tests import inputs
from tests import numpy_math
from tests import tolerances

F32 = tolerances.output(jnp.float32)
GRAD = tolerances.grad(jnp.float32)


# ----------------------------------------------------------------------------------------------------
# NATTEN's window rule in numpy, one axis at a time: the key coordinates a query coordinate x sees.


def _natten_window(x, L, k, d=1, causal=False):
  """Stride 1: the window of NATTEN's CUDA kernels (`get_window_start` with dilation; causal: the k
  most recent tokens of the residue class)."""
  ns = k // 2
  if causal:
    return {y for y in range(x - (k - 1) * d, x + 1, d) if y >= 0}
  if d <= 1:
    start = max(x - ns, 0) + (x + ns >= L) * (L - x - ns - 1)
  elif x - ns * d < 0:
    start = x % d
  elif x + ns * d >= L:
    imodd, a = x % d, (L // d) * d
    b = L - a
    start = L - b + imodd - 2 * ns * d if imodd < b else a + imodd - k * d
  else:
    start = x - ns * d
  return {start + t * d for t in range(k)}


def _gna_window(x, L, k, s, d, causal):
  """Any stride: NATTEN's Flex mask (the stride group's leader; its window centre clamped so the
  window stays inside the residue class's L_r tokens)."""
  r, i = x % d, x // d
  L_r = len(range(r, L, d))
  if causal:
    leader = min((i // s) * s + s - 1, L_r - 1)
    sub = {j for j in range(L_r) if j <= i and leader - j < k}
  else:
    left, right = k // 2, k // 2 + (k % 2 - 1)
    center = min(max(min((i // s) * s + s // 2, L_r - 1), left), L_r - 1 - right)
    sub = {j for j in range(L_r) if -left <= j - center <= right}
  return {j * d + r for j in sub}


def _visible_numpy(shape, window):
  """Bool `[L, L]`: query (row) sees key (column), `window(axis, x)` giving each axis's key set."""
  coords = list(itertools.product(*(range(n) for n in shape)))
  keep = np.zeros((len(coords), len(coords)), bool)
  for qi, xq in enumerate(coords):
    sets = [window(a, x) for a, x in enumerate(xq)]
    for ki, xk in enumerate(coords):
      keep[qi, ki] = all(y in s for y, s in zip(xk, sets, strict=True))
  return keep


def _visible_from_operator(fn, shape, **kw):
  """Bool `[L, L]` read off the operator: zero queries weight their visible keys equally and
  one-hot values return those weights. The dense `reference` path (fast to compile); the tests of
  outputs below run the tiled `xla` path on N-D windows."""
  L = int(np.prod(shape))
  _, k, _ = inputs.qkv(B=1, T=L, N=2, K=1, H=4, h=1, seed=3)
  q = jnp.zeros((1, L, 2, 4))
  v = jnp.broadcast_to(jnp.eye(L)[None, :, None, :], (1, L, 1, L))
  out = np.asarray(inputs.jit_with(fn, spatial_shape=shape, implementation="reference", **kw)(q, k, v))
  np.testing.assert_allclose(out[0, :, 0], out[0, :, 1], **F32)
  return out[0, :, 0] > 0


CASES = [
    # (name, operator, grid, keywords, window(axis, x) in numpy)
    ("na_2d", nb.neighborhood_attention, (5, 7), dict(kernel_size=3),
     lambda shape: lambda a, x: _natten_window(x, shape[a], 3)),
    ("na_3d_per_axis", nb.neighborhood_attention, (3, 5, 6), dict(kernel_size=(3, 5, 3)),
     lambda shape: lambda a, x: _natten_window(x, shape[a], (3, 5, 3)[a])),
    ("dina_3d", nb.dilated_neighborhood_attention, (3, 5, 7),
     dict(kernel_size=3, dilation=(1, 1, 2)),
     lambda shape: lambda a, x: _natten_window(x, shape[a], 3, (1, 1, 2)[a])),
    ("gna_causal_rows", nb.generalized_neighborhood_attention, (5, 7),
     dict(kernel_size=3, dilation=(1, 2), is_causal=(True, False)),
     lambda shape: lambda a, x: _natten_window(x, shape[a], 3, (1, 2)[a], causal=a == 0)),
    ("gna_stride_even_kernel", nb.generalized_neighborhood_attention, (7, 6),
     dict(kernel_size=(5, 4), stride=(2, 3)),
     lambda shape: lambda a, x: _gna_window(x, shape[a], (5, 4)[a], (2, 3)[a], 1, False)),
    ("gna_causal_stride_dilated", nb.generalized_neighborhood_attention, (13,),
     dict(kernel_size=4, stride=3, dilation=2, causal=True),
     lambda shape: lambda a, x: _gna_window(x, 13, 4, 3, 2, True)),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_window_positions_follow_nattens_rule(case):
  _, fn, shape, kw, window = case
  got = _visible_from_operator(fn, shape, **kw)
  want = _visible_numpy(shape, window(shape))
  np.testing.assert_array_equal(got, want)
  if not kw.get("causal") and not any(np.atleast_1d(kw.get("is_causal", False))):
    # Exactly ∏ k keys for every query, corners included: shifted windows, never truncated.
    assert (got.sum(1) == np.prod(np.broadcast_to(kw["kernel_size"], (len(shape),)))).all()


def _attention_float64(q, k, v, keep, bias=None):
  """softmax(q·k/√H + bias) v over the pairs of `keep [T, S]`, heads by GQA repetition."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  G = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
  s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  if bias is not None:
    s = s + bias[None]
  w = numpy_math.softmax(s, where=keep[None, None])
  return np.einsum("bnts,bsnh->btnh", w, v)


@pytest.mark.parametrize("shape", [(7,), (5, 7), (3, 5, 5)])
def test_kernel_equal_to_the_map_is_full_attention(shape):
  L = int(np.prod(shape))
  q, k, v = inputs.qkv(B=2, T=L, N=4, K=2, H=8, h=6, seed=1)
  out = inputs.jit_with(nb.neighborhood_attention, kernel_size=shape, spatial_shape=shape)(q, k, v)
  np.testing.assert_allclose(np.asarray(out), _attention_float64(q, k, v, np.ones((L, L), bool)),
                             **F32)


def _rpb_bias_numpy(rpb, shape, kernel, dilation):
  """`[N, L, L]` float64: rpb[n, (y_a // δ_a - x_a // δ_a) + k_a - 1 for each axis a] (NATTEN's
  layout), at every pair (entries out of range are outside the window and get 0)."""
  rpb = np.asarray(rpb, np.float64)
  coords = list(itertools.product(*(range(n) for n in shape)))
  bias = np.zeros((rpb.shape[0], len(coords), len(coords)))
  for qi, xq in enumerate(coords):
    for ki, xk in enumerate(coords):
      idx = tuple(y // d - x // d + w - 1 for y, x, w, d in zip(xk, xq, kernel, dilation,
                                                                  strict=True))
      if all(0 <= i <= 2 * w - 2 for i, w in zip(idx, kernel, strict=True)):
        bias[:, qi, ki] = rpb[(slice(None),) + idx]
  return bias


@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_relative_position_bias_matches_a_numpy_einsum_and_its_gradient(implementation):
  shape, kernel, dilation = (5, 7), (3, 3), (1, 2)
  L, N = 35, 4
  q, k, v = inputs.qkv(B=2, T=L, N=N, K=2, H=8, h=6, seed=2)
  rpb = 0.5 * jax.random.normal(jax.random.PRNGKey(7), (N, 5, 5))
  fn = inputs.jit_with(nb.dilated_neighborhood_attention, kernel_size=kernel, dilation=dilation,
                       spatial_shape=shape, implementation=implementation)
  call = lambda q, k, v, rpb: fn(q, k, v, rpb=rpb)
  keep = _visible_numpy(shape, lambda a, x: _natten_window(x, shape[a], 3, dilation[a]))

  def out64(q, k, v, rpb):
    return _attention_float64(q, k, v, keep, _rpb_bias_numpy(rpb, shape, kernel, dilation))

  np.testing.assert_allclose(np.asarray(call(q, k, v, rpb)), out64(q, k, v, rpb), **F32)
  # The bias moves the output (so the check above is not blind to it), and its gradient -- like
  # those of q, k, v -- matches the float64 loss's directional derivatives.
  assert tolerances.rel_rms(call(q, k, v, 0 * rpb), call(q, k, v, rpb)) > tolerances.CHANGED_REL_RMS
  dout = np.asarray(jax.random.normal(jax.random.PRNGKey(8), (2, L, N, 6)), np.float64)
  grads = jax.grad(lambda *a: jnp.sum(call(*a) * dout), argnums=(0, 1, 2, 3))(q, k, v, rpb)
  assert np.abs(np.asarray(grads[3])).min() > 0      # every offset occurs: every entry is reached
  numpy_math.check_directional_derivatives(
      grads, (q, k, v, rpb), lambda *a: float(np.sum(out64(*a) * dout)), ("q", "k", "v", "rpb"),
      rng=np.random.default_rng(0), tol=GRAD)


@pytest.mark.parametrize("shape,tile", [((12,), (4,)), ((6, 4), (3, 2))])
def test_stride_equal_to_the_kernel_is_blocked_attention(shape, tile):
  L = int(np.prod(shape))
  q, k, v = inputs.qkv(B=2, T=L, N=4, K=2, H=8, h=6, seed=4)
  out = inputs.jit_with(nb.generalized_neighborhood_attention, kernel_size=tile, stride=tile,
                        spatial_shape=shape)(q, k, v)
  coords = np.array(list(itertools.product(*(range(n) for n in shape))))
  tiles = coords // np.array(tile)
  same_tile = (tiles[:, None, :] == tiles[None, :, :]).all(-1)
  np.testing.assert_allclose(np.asarray(out), _attention_float64(q, k, v, same_tile), **F32)


def test_dilation_is_neighborhood_attention_on_each_subsampled_grid():
  shape, dilation, kernel = (7, 9), (2, 3), 3
  q, k, v = inputs.qkv(B=2, T=63, N=4, K=2, H=8, h=6, seed=5)
  out = inputs.jit_with(nb.generalized_neighborhood_attention, kernel_size=kernel,
                        dilation=dilation, spatial_shape=shape)(q, k, v)
  grid_of = lambda x: x.reshape((x.shape[0],) + shape + x.shape[2:])
  out = grid_of(out)
  na = {}   # one compiled NA per subgrid shape
  for r0, r1 in itertools.product(range(dilation[0]), range(dilation[1])):
    part = (slice(None), slice(r0, None, dilation[0]), slice(r1, None, dilation[1]))
    sub = [grid_of(x)[part] for x in (q, k, v)]
    sub_shape = sub[0].shape[1:3]
    if sub_shape not in na:
      na[sub_shape] = inputs.jit_with(nb.neighborhood_attention, kernel_size=kernel,
                                      spatial_shape=sub_shape)
    alone = na[sub_shape](*(x.reshape((2, -1) + x.shape[3:]) for x in sub))
    np.testing.assert_allclose(np.asarray(out[part]), np.asarray(alone).reshape(out[part].shape),
                               **F32)


def test_causal_grid_decodes_over_a_cache_like_the_full_forward():
  # Every axis causal: a token's window holds only earlier tokens in row-major order, so a KV cache
  # of the whole 4x5 map (filled part in kv_lengths, garbage after it) decodes token by token.
  shape, L = (4, 5), 20
  q, k, v = inputs.qkv(B=2, T=L, N=4, K=2, H=8, h=6, seed=6)
  fn = inputs.jit_with(nb.neighborhood_attention, kernel_size=3, spatial_shape=shape, causal=True)
  full = fn(q, k, v)
  keep = _visible_numpy(shape, lambda a, x: _natten_window(x, shape[a], 3, causal=True))
  np.testing.assert_allclose(np.asarray(full), _attention_float64(q, k, v, keep), **F32)
  step = jax.jit(lambda q_t, k, v, t: nb.neighborhood_attention(
      q_t, k, v, kernel_size=3, spatial_shape=shape, causal=True, q_offset=t, kv_lengths=t + 1))
  for t in (0, 7, 13, 19):
    garbage = lambda x: x.at[:, t + 1:].set(1e4)
    out = step(q[:, t:t + 1], garbage(k), garbage(v), jnp.full((2,), t, jnp.int32))
    np.testing.assert_allclose(np.asarray(out[:, 0]), np.asarray(full[:, t]), **F32)


def test_empty_row_gives_zeros_and_finite_gradients():
  q, k, v = inputs.qkv(B=2, T=9, N=4, K=2, H=8, h=6)

  def loss(q, k, v):
    out = nb.neighborhood_attention(q, k, v, kernel_size=3, kv_lengths=jnp.array([0, 9]))
    return jnp.sum(out ** 2), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  np.testing.assert_array_equal(np.asarray(out[0]), 0.0)
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_bad_arguments_name_the_operator_and_argument():
  q, k, v = inputs.qkv(B=1, T=12, N=2, K=1, H=4, h=4)
  with pytest.raises(ValueError, match="neighborhood_attention: `kernel_size` must be odd"):
    nb.neighborhood_attention(q, k, v, kernel_size=4)
  with pytest.raises(ValueError, match="`stride` cannot exceed"):
    nb.generalized_neighborhood_attention(q, k, v, kernel_size=3, stride=4)
  with pytest.raises(ValueError, match="exceeds the grid"):
    nb.dilated_neighborhood_attention(q, k, v, kernel_size=5, dilation=3)
  with pytest.raises(ValueError, match="spatial_shape"):
    nb.neighborhood_attention(q, k, v, kernel_size=3, spatial_shape=(5, 3))
  with pytest.raises(ValueError, match="`rpb` must have shape"):
    nb.neighborhood_attention(q, k, v, kernel_size=3, spatial_shape=(3, 4), rpb=jnp.zeros((2, 5)))
  with pytest.raises(ValueError, match="`segment_ids`"):
    nb.neighborhood_attention(q, k, v, kernel_size=3, spatial_shape=(3, 4),
                              segment_ids=jnp.zeros((1, 12), jnp.int32))
  with pytest.raises(ValueError, match="self-attention only"):
    nb.neighborhood_attention(q, k[:, :9], v[:, :9], kernel_size=3)
