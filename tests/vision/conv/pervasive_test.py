"""Pervasive Attention (#115, arXiv:1808.03867): the masked DenseNet over the (target, source) grid
against a float64 rewrite that crops the kernel to its past rows instead of masking it; the
paper's defining property, target causality (row i reads the target inputs of rows ≤ i only, the
reach growing by k // 2 rows a layer) with the whole source read both ways; padded sources as the
convolutions' zero padding; and clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax.vision import conv
from tests import tolerances
from tests.vision.conv import reference

F32 = lambda a: jnp.asarray(a, jnp.float32)


def _weights(rng, C0, C1, L, g, k, mid):
  w = {"reduce": rng.standard_normal((C0, C1)) / np.sqrt(C0), "reduce_bias": rng.standard_normal(C1)}
  c = C1
  for i in range(L):
    w.update({f"l{i}_scale1": 1 + 0.3 * rng.standard_normal(c), f"l{i}_bias1": rng.standard_normal(c),
              f"l{i}_w1": rng.standard_normal((c, mid)) / np.sqrt(c),
              f"l{i}_scale2": 1 + 0.3 * rng.standard_normal(mid),
              f"l{i}_bias2": rng.standard_normal(mid),
              f"l{i}_w2": rng.standard_normal((k, k, mid, g)) / np.sqrt(k * k * mid)})
    c += g
  return w


def _norm(x, scale, bias, eps=1e-5):
  mean = x.mean(-1, keepdims=True)
  return scale * (x - mean) / (x.std(-1, ddof=1, keepdims=True) + eps) + bias


def _reference(grid, w, L):
  """One example's grid `[1, T, S, C0]` (real sources only), float64: the kernel cropped to rows
  0 … k//2 with the target axis padded on the past side only."""
  relu = lambda a: np.maximum(a, 0.0)
  feats = [grid @ w["reduce"] + w["reduce_bias"]]
  for i in range(L):
    x = np.concatenate(feats, -1)
    y = relu(_norm(relu(_norm(x, w[f"l{i}_scale1"], w[f"l{i}_bias1"])) @ w[f"l{i}_w1"],
                   w[f"l{i}_scale2"], w[f"l{i}_bias2"]))
    k = w[f"l{i}_w2"].shape[0]
    feats.append(reference.conv2d(y, w[f"l{i}_w2"][:k // 2 + 1],
                                  pad=((k // 2, 0), (k // 2, k // 2))))
  return np.concatenate(feats, -1).max(axis=2)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_matches_float64_reference_with_padded_sources(k):
  rng = np.random.default_rng(k)
  B, T, S, C0, L, g, mid = 2, 5, 6, 8, 2, 3, 4
  w = _weights(rng, C0, 4, L, g, k, mid)
  grid = rng.standard_normal((B, T, S, C0))
  lengths = (6, 4)                                            # example 1: two padded sources
  mask = np.arange(S)[None] < np.array(lengths)[:, None]
  out = conv.pervasive_attention(F32(grid), jnp.asarray(mask), **{n: F32(a) for n, a in w.items()})
  assert out.shape == (B, T, 4 + L * g)
  for b, n in enumerate(lengths):
    np.testing.assert_allclose(out[b], _reference(grid[b:b + 1, :, :n], w, L)[0],
                               **tolerances.output(jnp.float32))


def _setup(seed=0, L=3, k=3):
  rng = np.random.default_rng(seed)
  w = {n: F32(a) for n, a in _weights(rng, 8, 4, L, 2, k, 4).items()}
  return w, F32(rng.standard_normal((1, 9, 5, 8)))


def test_target_causality_and_the_reach_of_the_stack():
  """∂h_i / ∂X[i'] is zero for every later target row i' > i; with L layers of k = 3 it is nonzero
  back to i' = i - L and zero before (each masked layer reaches k // 2 = 1 row further back)."""
  L = 3
  w, grid = _setup(L=L)
  jac = jax.jacrev(lambda g: conv.pervasive_attention(g, **w))(grid)   # [1, T, C, 1, T, S, C0]
  reach = np.abs(np.asarray(jac)).sum(axis=(0, 2, 3, 5, 6))            # [T out, T in]
  T = reach.shape[0]
  for i in range(T):
    for i2 in range(T):
      if i2 > i or i2 < i - L:
        assert reach[i, i2] == 0.0, (i, i2)
      else:
        assert reach[i, i2] > 0.0, (i, i2)


def test_every_source_position_reaches_every_target_row():
  """The source axis is not masked: perturbing any one source column moves every output row."""
  w, grid = _setup(seed=1)
  base = conv.pervasive_attention(grid, **w)
  for j in range(grid.shape[2]):
    moved = conv.pervasive_attention(grid.at[:, :, j].add(1.0), **w)
    assert np.all(np.abs(np.asarray(moved - base)).max(axis=-1) > 0), j


def test_pooling_is_the_max_over_sources():
  """With no layers the output is the max over j of the first linear layer's output."""
  rng = np.random.default_rng(3)
  grid, W, bias = rng.standard_normal((2, 3, 4, 6)), rng.standard_normal((6, 3)), rng.standard_normal(3)
  out = conv.pervasive_attention(F32(grid), reduce=F32(W), reduce_bias=F32(bias))
  np.testing.assert_allclose(out, (grid @ W + bias).max(axis=2), **tolerances.output(jnp.float32))


def test_padded_sources_are_ignored_and_no_source_gives_zeros():
  w, grid = _setup(seed=2)
  mask = jnp.asarray([[True, True, True, False, False]])
  out = conv.pervasive_attention(grid, mask, **w)
  noise = grid.at[:, :, 3:].set(100.0)
  np.testing.assert_array_equal(out, conv.pervasive_attention(noise, mask, **w))
  empty = conv.pervasive_attention(grid, jnp.zeros((1, 5), bool), **w)
  assert np.all(np.asarray(empty) == 0.0)


def test_grid_is_source_then_target_channels():
  rng = np.random.default_rng(4)
  t, s = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5, 6))
  grid = conv.pervasive_grid(F32(t), F32(s))
  assert grid.shape == (2, 3, 5, 10)
  np.testing.assert_array_equal(grid[1, 2, 4], np.concatenate([F32(s)[1, 4], F32(t)[1, 2]]))


def test_linen_defaults_are_the_papers_network():
  rec = aj.get_module("pervasive_attention")
  layer = rec.linen()
  assert (layer.num_layers, layer.growth_rate, layer.kernel_size, layer.bottleneck) == (24, 32, 3, 4)
  shapes = jax.eval_shape(lambda: layer.init(jax.random.PRNGKey(0), jnp.zeros((1, 3, 4, 256))))
  params = shapes["params"]
  assert params["reduce"].shape == (256, 128) and params["l23_w2"].shape == (3, 3, 128, 32)
  out = jax.eval_shape(layer.apply, shapes, jax.ShapeDtypeStruct((1, 3, 4, 256), jnp.float32))
  assert out.shape == rec.output_shape((1, 3, 4, 256)) == (1, 3, 128 + 24 * 32)


def test_bad_inputs_are_clear_errors():
  w, grid = _setup()
  with pytest.raises(ValueError, match="pervasive_attention: `grid` must be"):
    conv.pervasive_attention(grid[0], **w)
  with pytest.raises(ValueError, match="`source_mask` must be"):
    conv.pervasive_attention(grid, jnp.ones((1, 4), bool), **w)
  with pytest.raises(ValueError, match="missing \\['l2_w2'\\]"):
    conv.pervasive_attention(grid, **{n: a for n, a in w.items() if n != "l2_w2"})
  bad = dict(w, l0_w2=jnp.ones((2, 2, 4, 2)))
  with pytest.raises(ValueError, match="layer 0: `l0_w1` must be"):
    conv.pervasive_attention(grid, **bad)
