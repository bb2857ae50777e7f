"""Window attention (Swin W-MSA / SW-MSA, arXiv:2103.14030) and MSWA (arXiv:2501.01039).

Swin's defining computation: pad the map to a multiple of the window, roll it by -shift, partition it
into windows, attend inside each window with the relative position bias and the region mask that
keeps tokens of different original regions apart, and roll back. The operator does it as one
mask_mod on the original coordinates; the tests run Swin's own steps in float64 numpy (np.roll,
window partition, the `img_mask` regions of Swin's code, padded tokens hidden) and compare, on 2-D
maps with divisible and non-divisible sides and on a 1-D sequence, for both implementations, and the
gradients of the xla path against the reference. Packed 1-D documents restart the tiling.

MSWA: each head's keys are the last w_n positions (float64 rewrite per head, GQA); MSWA-h's
allocation is the paper's (w/4, w/2, w, 2w) and keeps at most the uniform window's cache (its claim
"at equal or lower cache"); the per-layer windows go through `TransformerConfig.mechanism_kwargs`
(the receptive field of a two-layer causal stack is the sum of the layers' largest windows).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax.core import grid
from attnjax.nn import blocks
from attnjax.ops.local import window as window_ops
from tests import inputs
from tests import numpy_math
from tests import tolerances

F32 = jnp.float32


def _expand(x, N):
  """`[B, S, K, D]` → `[B, S, N, D]` (query head n reads key head n // (N / K)), float64."""
  x = np.asarray(x, np.float64)
  return np.repeat(x, N // x.shape[2], axis=2)


def _swin_numpy(q, k, v, spatial_shape, window, shift, table=None):
  """Swin's SW-MSA steps in float64: pad, roll, partition, bias + region mask, attend, roll back."""
  q = np.asarray(q, np.float64)
  B, L, N, H = q.shape
  k, v = _expand(k, N), _expand(v, N)
  shape = tuple(spatial_shape) if len(spatial_shape) == 2 else (1,) + tuple(spatial_shape)
  window = tuple(window) if len(window) == 2 else (1,) + tuple(window)
  shift = tuple(shift) if len(shift) == 2 else (0,) + tuple(shift)
  padded = tuple(-(-n // w) * w for n, w in zip(shape, window, strict=True))
  (wh, ww), (sh, sw) = window, shift

  def grid(x, fill=0.0):
    out = np.full((B,) + padded + x.shape[2:], fill, x.dtype)
    out[:, :shape[0], :shape[1]] = x.reshape((B,) + shape + x.shape[2:])
    return np.roll(out, (-sh, -sw), axis=(1, 2))

  qg, kg, vg = grid(q), grid(k), grid(v)
  real = grid(np.ones((B, L), bool), fill=False)
  # Swin's img_mask: regions of the padded map (one slice on an axis without shift).
  region = np.zeros(padded, int)
  h_slices = (slice(0, -wh), slice(-wh, -sh), slice(-sh, None)) if sh else (slice(None),)
  w_slices = (slice(0, -ww), slice(-ww, -sw), slice(-sw, None)) if sw else (slice(None),)
  count = 0
  for hs in h_slices:
    for ws in w_slices:
      region[hs, ws] = count
      count += 1
  out = np.zeros(qg.shape[:3] + (N, v.shape[-1]))
  for i0 in range(0, padded[0], wh):
    for j0 in range(0, padded[1], ww):
      rows, cols = np.meshgrid(np.arange(i0, i0 + wh), np.arange(j0, j0 + ww), indexing="ij")
      rows, cols = rows.ravel(), cols.ravel()
      logits = np.einsum("bqnh,bknh->bnqk", qg[:, rows, cols], kg[:, rows, cols]) * H ** -0.5
      if table is not None:
        c = (int(np.sqrt(table.shape[0])) + 1) // 2
        index = (rows[:, None] - rows[None] + c - 1) * (2 * c - 1) + cols[:, None] - cols[None] + c - 1
        logits = logits + np.asarray(table, np.float64)[index].transpose(2, 0, 1)[None]
      same = region[rows, cols][:, None] == region[rows, cols][None]
      keep = same[None, None] & real[:, rows, cols][:, None, None, :]
      # A padded query row sees nothing (NaN in numpy); it is cropped away below.
      with np.errstate(invalid="ignore"):
        weights = numpy_math.softmax(logits, where=keep)
      out[:, rows, cols] = np.einsum("bnqk,bknh->bqnh", weights, vg[:, rows, cols])
  out = np.roll(out, (sh, sw), axis=(1, 2))[:, :shape[0], :shape[1]]
  return out.reshape(B, L, N, -1)


# (settings, with Swin's relative position bias or not)
CASES = {
    "2d_divisible_bias": (dict(spatial_shape=(6, 8), window_size=(3, 4), shift=(1, 2)), True),
    "2d_ragged": (dict(spatial_shape=(5, 7), window_size=3, shift=1), False),
    "2d_no_shift": (dict(spatial_shape=(4, 6), window_size=(2, 3), shift=0), False),
    "1d_ragged_bias": (dict(spatial_shape=(19,), window_size=4, shift=2), True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_equals_swin_roll_partition_mask_roll_back(case):
  kw, bias = CASES[case]
  L = int(np.prod(kw["spatial_shape"]))
  q, k, v = inputs.qkv(B=2, T=L, N=4, K=2, H=8, h=6, seed=1)
  dims = len(kw["spatial_shape"])
  window = grid.per_axis(kw["window_size"], dims, "test", "window_size")
  shift = grid.per_axis(kw["shift"], dims, "test", "shift")
  table = None
  if bias:  # Swin's own table size: C = the (square) window, here the largest side of the window
    c = max(window)
    table = jax.random.normal(jax.random.PRNGKey(3), ((2 * c - 1) ** 2, 4))
  want = _swin_numpy(q, k, v, kw["spatial_shape"], window, shift, table)
  extra = {} if table is None else {"relative_position_bias": table}
  for impl in ("xla", "reference"):
    fn = inputs.jit_with(window_ops.window_attention, implementation=impl, **kw)
    np.testing.assert_allclose(fn(q, k, v, **extra), want, **tolerances.output(F32))


def test_xla_gradients_equal_the_reference_with_bias():
  kw = CASES["2d_ragged"][0]
  q, k, v = inputs.qkv(B=1, T=35, N=4, K=2, H=8, h=6, seed=2)
  table = jax.random.normal(jax.random.PRNGKey(4), (25, 4))
  dout = jax.random.normal(jax.random.PRNGKey(5), (1, 35, 4, 6))
  fn = lambda impl: lambda q, k, v, t: window_ops.window_attention(
      q, k, v, relative_position_bias=t, implementation=impl, **kw)
  inputs.assert_same_gradients(fn("xla"), fn("reference"), (q, k, v, table), dout,
                               ("dq", "dk", "dv", "dtable"), tol=tolerances.grad(F32))


def test_packed_documents_restart_the_windows():
  lengths = (5, 14)  # not multiples of the window: a tiling across documents would differ
  q, k, v = inputs.qkv(B=2, T=19, N=4, K=2, H=8, h=6, seed=3)
  seg = jnp.broadcast_to(jnp.repeat(jnp.arange(2), jnp.array(lengths), total_repeat_length=19),
                         (2, 19))
  fn = inputs.jit_with(window_ops.window_attention, window_size=4, shift=1)
  packed = fn(q, k, v, segment_ids=seg)
  np.testing.assert_allclose(packed[:, :5], fn(q[:, :5], k[:, :5], v[:, :5]), **tolerances.output(F32))
  np.testing.assert_allclose(packed[:, 5:], fn(q[:, 5:], k[:, 5:], v[:, 5:]), **tolerances.output(F32))


def test_bad_settings_are_clear_errors():
  q, k, v = inputs.qkv(B=1, T=12, N=4, K=2, H=8, h=6)
  with pytest.raises(ValueError, match="window_attention: `shift`"):
    window_ops.window_attention(q, k, v, window_size=4, shift=4)
  with pytest.raises(ValueError, match="window_attention: `spatial_shape`"):
    window_ops.window_attention(q, k, v, window_size=2, spatial_shape=(3, 5))
  with pytest.raises(ValueError, match="covers windows up to 2 x 2"):
    window_ops.window_attention(q, k, v, window_size=3, relative_position_bias=jnp.zeros((9, 4)))


def _mswa_numpy(q, k, v, widths, causal):
  q = np.asarray(q, np.float64)
  B, T, N, H = q.shape
  k, v = _expand(k, N), _expand(v, N)
  distance = np.arange(T)[:, None] - np.arange(T)[None]
  keep = np.stack([np.abs(distance) < w for w in widths])[None]
  if causal:
    keep = keep & (distance >= 0)
  logits = np.einsum("bqnh,bknh->bnqk", q, k) * H ** -0.5
  return np.einsum("bnqk,bknh->bqnh", numpy_math.softmax(logits, where=keep), v)


@pytest.mark.parametrize("causal", [False, True])
def test_mswa_each_head_sees_its_own_window(causal):
  q, k, v = inputs.qkv(B=2, T=21, N=8, K=2, H=8, h=6, seed=4)
  widths = window_ops.mswa_head_windows(8, 8)
  want = _mswa_numpy(q, k, v, widths, causal)
  for impl in ("xla", "reference"):
    fn = inputs.jit_with(window_ops.multi_scale_window_attention, window=8, causal=causal,
                         implementation=impl)
    np.testing.assert_allclose(fn(q, k, v), want, **tolerances.output(F32))
  dout = jax.random.normal(jax.random.PRNGKey(6), (2, 21, 8, 6))
  fn = lambda impl: lambda q, k, v: window_ops.multi_scale_window_attention(
      q, k, v, head_windows=widths, causal=causal, implementation=impl)
  inputs.assert_same_gradients(fn("xla"), fn("reference"), (q, k, v), dout, ("dq", "dk", "dv"),
                               tol=tolerances.grad(F32))


def test_mswa_h_allocation_and_cache_at_most_uniform_sliding_window():
  assert window_ops.mswa_head_windows(16, 8) == (4, 4, 8, 8, 16, 16, 32, 32)
  mswa = aj.get_mechanism("multi_scale_window_attention")
  T, N, H, h, w = 4096, 8, 64, 64, 512
  uniform = N * w * (H + h)   # SWA: every head keeps its last w keys and values
  assert mswa.decode_state_floats(T, N, N, H, h, {"window": w}) <= uniform


def test_per_layer_windows_through_transformer_config():
  # Two causal layers with MSWA windows 2 (heads 1, 1, 2, 4) and 8 (heads 2, 4, 8, 16): the last
  # token's receptive field reaches back (4 - 1) + (16 - 1) = 18 positions, no further.
  T, D = 24, 8
  cfg = blocks.TransformerConfig(
      width=D, num_heads=4, mechanisms=("multi_scale_window_attention",) * 2,
      mechanism_kwargs=({"window": 2}, {"window": 8}), mlp_dim=8, causal=True)
  model = blocks.Transformer(cfg)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, T, D))
  params = model.init(jax.random.PRNGKey(1), x)
  run = jax.jit(lambda x: model.apply(params, x)[0, -1])
  base = run(x)
  reach = T - 1 - 18
  far = run(x.at[0, reach - 1].add(5.0))
  near = run(x.at[0, reach].add(5.0))
  np.testing.assert_allclose(far, base, **tolerances.output(F32))
  assert float(jnp.max(jnp.abs(near - base))) > tolerances.CHANGED_MAX_ABS
