"""ConvShareViT (#16): shared depthwise convolutions in place of the q/k/v projections.

The layer's definition: each token's features are C maps of h × w; every map of every token is
convolved (valid padding) with the same M kernels. Checked: the parameter count M·k² (+ M biases)
against the D_in·D_out of the linear layer it replaces, and the output width C·M·(h-k+1)(w-k+1);
the output against an explicit float64 loop over tokens, maps, kernels and kernel offsets (valid and
same padding); the sharing itself (the layer acts on each token alone, and identical input maps give
identical outputs); a kernel as large as the token map is exactly a linear layer; the attention
layer against a float64 rewrite (conv projections, softmax per head, dense output projection).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.nn import ConvShareAttention, ConvSharedProjection
from tests import tolerances

B, T, C, SIDE, M, KS = 2, 5, 2, 6, 3, 3
F32 = tolerances.output(jnp.float32)


def _x(shape=(B, T, C * SIDE * SIDE), seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def _init(layer, *args):
  variables = jax.jit(layer.init)(jax.random.PRNGKey(0), *args)
  leaves, tree = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  return jax.tree.unflatten(tree, [a + 0.3 * jax.random.normal(k, a.shape)
                                   for a, k in zip(leaves, keys, strict=True)])


def _conv_float64(x, kernel, bias, *, padding, C=C, side=SIDE):
  """y[b, t, c, m, i, j] = Σ_{di, dj} x[b, t, c, i + di - p, j + dj - p] K[di, dj, m] + b_m, by loops
  (zero outside the map; p = 0 for valid, (k - 1) // 2 for same), flattened as (c, m, i, j)."""
  x = np.asarray(x, np.float64).reshape(B, -1, C, side, side)
  kernel, bias = np.asarray(kernel, np.float64)[:, :, 0], np.asarray(bias, np.float64)
  k = kernel.shape[0]
  pad = 0 if padding == "VALID" else (k - 1) // 2
  out_side = side - k + 1 if padding == "VALID" else side
  xp = np.pad(x, [(0, 0)] * 3 + [(pad, k - 1 - pad)] * 2) if padding == "SAME" else x
  y = np.zeros(x.shape[:3] + (kernel.shape[-1], out_side, out_side))
  for m in range(kernel.shape[-1]):
    for i in range(out_side):
      for j in range(out_side):
        for di in range(k):
          for dj in range(k):
            y[:, :, :, m, i, j] += xp[:, :, :, i + di, j + dj] * kernel[di, dj, m]
    y[:, :, :, m] += bias[m]
  return y.reshape(B, x.shape[1], -1)


@pytest.mark.parametrize("padding", ["VALID", "SAME"])
def test_projection_matches_the_convolution_loops(padding):
  x = _x()
  layer = ConvSharedProjection(M, KS, token_shape=(C, SIDE, SIDE), padding=padding)
  p = _init(layer, x)["params"]
  got = jax.jit(layer.apply)({"params": p}, x)
  side = SIDE - KS + 1 if padding == "VALID" else SIDE
  assert got.shape == (B, T, C * M * side * side)
  np.testing.assert_allclose(np.asarray(got), _conv_float64(x, p["kernel"], p["bias"],
                                                            padding=padding), **F32)


def test_parameter_count_is_independent_of_the_width():
  """M·k² + M weights for any token width, where the linear layer it replaces (to the same output
  width) has D_in·D_out + D_out."""
  for side in (6, 16, 32):
    d_in = C * side * side
    layer = ConvSharedProjection(M, KS, token_shape=(C, side, side))
    params = jax.eval_shape(lambda x: layer.init(jax.random.PRNGKey(0), x),
                            jax.ShapeDtypeStruct((1, 2, d_in), jnp.float32))["params"]
    assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params)) == M * KS * KS + M
    assert layer.output_maps(d_in) == (C, M, side - KS + 1, side - KS + 1)
  attention = ConvShareAttention(num_heads=M, kernel_size=KS, token_shape=(C, SIDE, SIDE))
  params = jax.eval_shape(lambda x: attention.init(jax.random.PRNGKey(0), x), _x())["params"]
  head_dim = C * (SIDE - KS + 1) ** 2
  assert (sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
          == 3 * (M * KS * KS + M) + M * head_dim * C * SIDE * SIDE + C * SIDE * SIDE)


def test_kernels_are_shared_across_tokens_and_maps():
  x = _x()
  layer = ConvSharedProjection(M, KS, token_shape=(C, SIDE, SIDE))
  p = _init(layer, x)
  apply = jax.jit(layer.apply)
  perm = jnp.array([3, 0, 4, 1, 2])
  np.testing.assert_array_equal(np.asarray(apply(p, x[:, perm])), np.asarray(apply(p, x)[:, perm]))
  same_maps = jnp.tile(x[..., :SIDE * SIDE], (1, 1, C))     # both maps of each token equal
  y = np.asarray(apply(p, same_maps)).reshape(B, T, C, -1)
  np.testing.assert_array_equal(y[:, :, 0], y[:, :, 1])


def test_a_kernel_as_large_as_the_map_is_a_linear_layer():
  """Valid padding with k = h = w leaves one number per kernel: y_m = <x, K_m> + b_m, the dense layer
  whose weight columns are the flattened kernels."""
  x = _x((B, T, SIDE * SIDE))
  layer = ConvSharedProjection(M, SIDE)
  p = _init(layer, x)["params"]
  got = jax.jit(layer.apply)({"params": p}, x)
  want = x @ p["kernel"].reshape(SIDE * SIDE, M) + p["bias"]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), **F32)


def _softmax(s):
  e = np.exp(s - s.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_attention_matches_its_rewrite():
  x = _x()
  layer = ConvShareAttention(num_heads=M, kernel_size=KS, token_shape=(C, SIDE, SIDE), causal=True)
  p = _init(layer, x)["params"]
  got = jax.jit(layer.apply)({"params": p}, x)

  def heads(name):
    y = _conv_float64(x, p[name]["kernel"], p[name]["bias"], padding="VALID")
    y = y.reshape(B, T, C, M, -1)
    return np.moveaxis(y, 3, 2).reshape(B, T, M, -1)         # head m: both maps' outputs

  q, k, v = heads("query"), heads("key"), heads("value")
  s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
  o = np.einsum("bnts,bsnh->btnh", _softmax(s), v)
  want = (np.einsum("btnh,nhf->btf", o, np.asarray(p["out"]["kernel"], np.float64))
          + np.asarray(p["out"]["bias"], np.float64))
  np.testing.assert_allclose(np.asarray(got), want, **F32)


def test_bad_settings_name_the_argument():
  init = lambda layer, x: layer.init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="token_shape"):
    init(ConvSharedProjection(M, KS), _x((B, T, 50)))
  with pytest.raises(ValueError, match="token_shape"):
    init(ConvSharedProjection(M, KS, token_shape=(3, SIDE, SIDE)), _x())
  with pytest.raises(ValueError, match="padding"):
    init(ConvSharedProjection(M, KS, token_shape=(C, SIDE, SIDE), padding="FULL"), _x())
  with pytest.raises(ValueError, match="kernel"):
    init(ConvSharedProjection(M, SIDE + 1, token_shape=(C, SIDE, SIDE)), _x())
