"""Spatial Sparse Attention (Direct3D-S2, arXiv:2505.17412): NSA's gated compressed / top-k selected /
window branches over voxel tokens, with 3-D blocks and windows.

Checked against a float64 numpy rewrite of the authors' computation written with explicit voxel
coordinates (blocks and windows as sets of tokens with equal coordinates // size, the compression
block as GroupNorm / SiLU / mean pool / two 3x3x3 convolutions over occupied blocks + pooled skip,
group-summed compressed probabilities per selection block, per-query top-k), branch by branch
through one-hot gates and with mixed gates, on a 4x4x6 grid with GQA, both implementations, a dense
grid and a partly occupied one (`kv_lengths`). The properties: selecting every block makes the
selected branch full attention; a 3-D block is the set of tokens with equal block coordinates (not a
run of flat indices); the window branch is attention within each (shifted) 3-D window.
"""

import functools
import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.core import flex
from attnjax.ops.sparse import spatial_sparse as ssa
from tests import inputs
from tests import numpy_math
from tests import tolerances

B, N, K, H, HV = 2, 4, 2, 8, 6
SHAPE = (4, 4, 6)
S = 96
L = 2                      # compression block (2x2x2)
ONE_HOT = np.eye(3, dtype=np.float32)


def _params(seed=0):
  rng = np.random.default_rng(seed)
  out = {}
  for name, f, _, _ in ssa.SSA_TABLE:
    shape = f(N, K, H, HV, block=L)
    x = rng.standard_normal(shape)
    if "norm" in name:
      x = np.stack([1 + 0.3 * x[:, 0], 0.3 * x[:, 1]], 1)
    elif "conv_k" in name or "conv_v" in name:
      x = x * (27 * shape[-2]) ** -0.5
    else:
      x = 0.3 * x
    out[name] = x.astype(np.float32)
  return out


def _silu(x):
  return x * numpy_math.sigmoid(x)


def _group_norm(x, scale, bias, groups):
  """x [n, C] (the occupied sites of one example)."""
  xg = x.reshape(x.shape[0], groups, -1)
  mean = xg.mean(axis=(0, 2), keepdims=True)
  var = ((xg - mean) ** 2).mean(axis=(0, 2), keepdims=True)
  return ((xg - mean) / np.sqrt(var + 1e-5)).reshape(x.shape) * scale + bias


def _compress(x, coords, pe, norm, conv, bias, groups):
  """Occupied blocks (sorted block coordinates) and their compressed tokens [nc, C] of x [n, C]."""
  if pe is not None:
    x = x + np.stack([pe[tuple(c % L)] for c in coords])
  h = _silu(_group_norm(x, norm[0, 0], norm[0, 1], groups))
  blocks = sorted({tuple(c // L) for c in coords})
  members = [[i for i, c in enumerate(coords) if tuple(c // L) == blk] for blk in blocks]
  hb = np.stack([h[m].mean(0) for m in members])
  skip = np.stack([x[m].mean(0) for m in members])

  def conv3(y, kernel, b):
    out = np.tile(b, (len(blocks), 1))
    for i, blk in enumerate(blocks):
      for off in itertools.product((-1, 0, 1), repeat=3):
        nb = tuple(np.add(blk, off))
        if nb in blocks:
          out[i] += y[blocks.index(nb)] @ kernel[off[0] + 1, off[1] + 1, off[2] + 1]
    return out

  y = conv3(hb, conv[0], bias[0])
  y = _silu(_group_norm(y, norm[1, 0], norm[1, 1], groups))
  return blocks, conv3(y, conv[1], bias[1]) + skip


def _ssa_numpy(q, k, v, gates, params, *, select_block, top_k, window, shift, groups, lengths):
  """(branches [3, B, T, N, h], gated output, chosen[b][t][kv head] = selected block coords)."""
  q, k, v, gates = (np.asarray(x, np.float64) for x in (q, k, v, gates))
  p = {name: np.asarray(x, np.float64) for name, x in params.items()}
  G, scale, ratio = N // K, H ** -0.5, select_block // L
  branches = np.zeros((3,) + q.shape[:3] + (v.shape[-1],))
  chosen = []
  for b in range(B):
    n_real = lengths[b]
    coords = np.stack(np.unravel_index(np.arange(n_real), SHAPE), -1)
    blocks, kc = _compress(k[b, :n_real].reshape(n_real, -1), coords, p["compress_pe_k"],
                           p["compress_norm_k"], p["compress_conv_k"], p["compress_conv_bias_k"],
                           groups)
    _, vc = _compress(v[b, :n_real].reshape(n_real, -1), coords, None, p["compress_norm_v"],
                      p["compress_conv_v"], p["compress_conv_bias_v"], groups)
    kc, vc = kc.reshape(len(blocks), K, H), vc.reshape(len(blocks), K, -1)
    sel_blocks = sorted({tuple(c // select_block) for c in coords})
    chosen.append([])
    for t in range(q.shape[1]):
      probs = np.stack([numpy_math.softmax(scale * kc[:, n // G] @ q[b, t, n]) for n in range(N)])
      for n in range(N):
        branches[0, b, t, n] = probs[n] @ vc[:, n // G]
      chosen[b].append([])
      for kh in range(K):
        group = probs[kh * G:(kh + 1) * G].sum(0)
        score = [sum(group[i] for i, blk in enumerate(blocks)
                     if tuple(np.array(blk) // ratio) == sb) for sb in sel_blocks]
        top = sorted(range(len(sel_blocks)), key=lambda j, s=score: -s[j])[:top_k]
        keep = {sel_blocks[j] for j in top}
        chosen[b][t].append(keep)
        seen = np.array([tuple(c // select_block) in keep for c in coords])
        for n in range(kh * G, (kh + 1) * G):
          w = numpy_math.softmax(scale * k[b, :n_real, kh] @ q[b, t, n], where=seen)
          branches[1, b, t, n] = w @ v[b, :n_real, kh]
      c_t = np.array(np.unravel_index(t, SHAPE))
      seen = np.all((coords + shift) // window == (c_t + shift) // window, axis=1)
      for n in range(N):
        if seen.any():
          w = numpy_math.softmax(scale * k[b, :n_real, n // G] @ q[b, t, n], where=seen)
          branches[2, b, t, n] = w @ v[b, :n_real, n // G]
  out = np.einsum("btc,cbtnh->btnh", gates, branches)
  return branches, out, chosen


@functools.lru_cache(maxsize=None)
def _compiled(settings, implementation, shape=SHAPE):
  return inputs.jit_with(ssa.spatial_sparse_attention, spatial_shape=shape, compress_block=L,
                         implementation=implementation, **dict(settings))


def _run(settings, implementation, shape=SHAPE):
  """The operator with these static settings, compiled once per test module."""
  return _compiled(tuple(sorted(settings.items())), implementation, shape)


CASES = {
    # selection blocks 4x4x4 (2 of them, one partial), the best one; windows 3^3 shifted by 1
    # (the shift is not w/2, so the authors' `(c + s) // w` and Swin's roll by s differ).
    "dense": dict(select_block=4, top_k=1, window_size=3, shift_window=1, num_groups=4),
    # selection blocks = compression blocks (12), top 3; windows 2^3 shifted by 1; the second
    # example has only its first 61 voxels occupied.
    "occupied_61": dict(select_block=2, top_k=3, window_size=2, shift_window=1, num_groups=2),
}


@pytest.mark.parametrize("implementation", ["xla", "reference"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_float64_rewrite_branch_by_branch(case, implementation):
  settings = CASES[case]
  lengths = [S, 61] if case == "occupied_61" else [S, S]
  q, k, v = inputs.qkv(B=B, T=S, N=N, K=K, H=H, h=HV, seed=3)
  params = _params()
  mixed = np.asarray(numpy_math.sigmoid(np.random.default_rng(1).standard_normal((B, S, 3))),
                     np.float32)
  branches, want, _ = _ssa_numpy(q, k, v, mixed, params, select_block=settings["select_block"],
                                 top_k=settings["top_k"], window=settings["window_size"],
                                 shift=settings["shift_window"], groups=settings["num_groups"],
                                 lengths=lengths)
  fn = _run(settings, implementation)
  kv_lengths = jnp.asarray(lengths, jnp.int32) if case == "occupied_61" else None
  real = np.arange(S)[None, :, None, None] < np.asarray(lengths)[:, None, None, None]
  for i, name in enumerate(("compressed", "selected", "window")):
    gates = jnp.broadcast_to(ONE_HOT[i], (B, S, 3))
    got = np.asarray(fn(q, k, v, gates=gates, kv_lengths=kv_lengths, **params))
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, branches[i], 0),
                               err_msg=f"{name} branch", **tolerances.output(jnp.float32))
  got = np.asarray(fn(q, k, v, gates=jnp.asarray(mixed), kv_lengths=kv_lengths, **params))
  np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0),
                             **tolerances.output(jnp.float32))


def test_selecting_every_block_is_full_attention():
  q, k, v = inputs.qkv(B=B, T=S, N=N, K=K, H=H, h=HV, seed=6)
  kv_lengths = jnp.asarray([S, 61], jnp.int32)
  settings = dict(CASES["occupied_61"], top_k=12)            # 2x2x2 selection blocks: 12 in all
  gates = jnp.broadcast_to(ONE_HOT[1], (B, S, 3))
  got = _run(settings, "xla")(q, k, v, gates=gates, kv_lengths=kv_lengths, **_params())
  full = flex.flex_attention(q, k, v, mask_mod=lambda b, n, qi, ki: ki < kv_lengths[b],
                             implementation="reference")
  real = np.arange(S)[None, :, None, None] < np.asarray(kv_lengths)[:, None, None, None]
  np.testing.assert_allclose(np.where(real, got, 0), np.where(real, full, 0),
                             **tolerances.output(jnp.float32))


def test_a_block_is_the_tokens_with_equal_block_coordinates():
  order, P = ssa.block_major_order(SHAPE, 2)
  first = set(order[:P].tolist())
  coords = np.stack(np.unravel_index(np.arange(S), SHAPE), -1)
  assert first == {i for i in range(S) if tuple(coords[i] // 2) == (0, 0, 0)}
  assert first != set(range(P))                                       # not a run of flat indices
  # The selected branch of a query reads exactly its chosen 4x4x4 block: values outside it do not
  # matter (values do not move the selection), one far from the block's first token does.
  settings = CASES["dense"]
  q, k, v = inputs.qkv(B=B, T=S, N=N, K=K, H=H, h=HV, seed=7)
  params = _params()
  gates = np.broadcast_to(ONE_HOT[1], (B, S, 3))
  _, _, chosen = _ssa_numpy(q, k, v, gates, params, select_block=4, top_k=1,
                            window=settings["window_size"], shift=settings["shift_window"],
                            groups=settings["num_groups"], lengths=[S, S])
  t = 40
  (blk,) = chosen[0][t][0]                                           # key head 0, example 0
  inside = [i for i in range(S) if tuple(coords[i] // 4) == blk]
  fn = _run(settings, "xla")
  base = np.asarray(fn(q, k, v, gates=jnp.asarray(gates), kv_lengths=None, **params))
  base = base[0, t, :N // K]
  outside = np.ones(S, bool)
  outside[inside] = False
  v_out = v.at[0, outside, 0].add(3.0)
  same = np.asarray(fn(q, k, v_out, gates=jnp.asarray(gates), kv_lengths=None, **params))
  same = same[0, t, :N // K]
  np.testing.assert_allclose(same, base, **tolerances.output(jnp.float32))
  far = max(inside)
  assert far - min(inside) >= 64                          # beyond any contiguous run of 4^3 tokens
  v_in = v.at[0, far, 0].add(3.0)
  moved = np.asarray(fn(q, k, v_in, gates=jnp.asarray(gates), kv_lengths=None, **params))
  moved = moved[0, t, :N // K]
  assert np.max(np.abs(moved - base)) > tolerances.CHANGED_MAX_ABS


def test_window_branch_is_attention_within_the_3d_window():
  settings = CASES["dense"]
  window, shift = settings["window_size"], settings["shift_window"]
  q, k, v = inputs.qkv(B=B, T=S, N=N, K=K, H=H, h=HV, seed=8)
  gates = jnp.broadcast_to(ONE_HOT[2], (B, S, 3))
  got = _run(settings, "xla")(q, k, v, gates=gates, kv_lengths=None, **_params())
  ids = (np.stack(np.unravel_index(np.arange(S), SHAPE), -1) + shift) // window
  same = jnp.asarray(np.all(ids[:, None] == ids[None], axis=-1))               # [S, S]
  want = flex.flex_attention(q, k, v, mask_mod=lambda b, n, qi, ki: same[qi, ki],
                             implementation="reference")
  np.testing.assert_allclose(got, want, **tolerances.output(jnp.float32))


def test_bad_settings_are_clear_errors():
  q, k, v = inputs.qkv(B=1, T=S, N=N, K=K, H=H, h=HV)
  gates = jnp.zeros((1, S, 3))
  kw = dict(gates=gates, **_params(), spatial_shape=SHAPE, compress_block=L)
  with pytest.raises(ValueError, match="select_block.*multiple"):
    ssa.spatial_sparse_attention(q, k, v, **kw, select_block=3)
  with pytest.raises(ValueError, match="num_groups"):
    ssa.spatial_sparse_attention(q, k, v, **kw, num_groups=5)
  with pytest.raises(ValueError, match="spatial_shape"):
    ssa.spatial_sparse_attention(q, k, v, **{**kw, "spatial_shape": (4, 4, 5)})
  with pytest.raises(ValueError, match="causal"):
    ssa.spatial_sparse_attention(q, k, v, **kw, causal=True)
