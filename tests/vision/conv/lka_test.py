"""Large kernel attention (#60, arXiv:2202.09741): the decomposition against a float64 rewrite, and
its impulse response: the centre output depends on exactly the (2d - 1) + (⌈K/d⌉ - 1)·d = 23 square
window (K = 21, d = 3), the receptive field of one large depthwise kernel, which the two depthwise
kernels compose into."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax.core import conv2d
from attnjax.vision import conv
from tests import tolerances
from tests.vision.conv import reference

F32 = lambda a: jnp.asarray(a, jnp.float32)


def _weights(rng, C, k1=5, k2=7):
  return dict(dw_kernel=rng.standard_normal((k1, k1, 1, C)) / k1,
              dw_bias=rng.standard_normal(C), dwd_kernel=rng.standard_normal((k2, k2, 1, C)) / k2,
              dwd_bias=rng.standard_normal(C), pw_kernel=rng.standard_normal((1, 1, C, C)),
              pw_bias=rng.standard_normal(C))


def test_kernel_sizes_and_receptive_field_of_the_decomposition():
  assert conv.lka_kernel_sizes(21, 3) == (5, 7)
  assert conv.lka_receptive_field(5, 7, 3) == 23                # ⊇ the 21×21 kernel it replaces


def test_against_float64():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 6, 7, 3))
  w = _weights(rng, 3)
  y = conv.large_kernel_attention(F32(x), **{n: F32(a) for n, a in w.items()}, dilation=3)
  attn = reference.depthwise(x, w["dw_kernel"][:, :, 0], w["dw_bias"])
  attn = reference.depthwise(attn, w["dwd_kernel"][:, :, 0], w["dwd_bias"], dilation=3)
  attn = reference.conv2d(attn, w["pw_kernel"], w["pw_bias"])
  np.testing.assert_allclose(y, attn * x, **tolerances.output(jnp.float32))


def test_impulse_response_is_exactly_the_large_kernel_window():
  rng = np.random.default_rng(1)
  N, C, c = 29, 2, 14                                           # the centre output (14, 14)
  w = {n: F32(a) for n, a in _weights(rng, C).items()}
  x = F32(rng.standard_normal((1, N, N, C)))
  grad = jax.jit(jax.grad(lambda x: jnp.sum(
      conv.large_kernel_attention(x, **w, dilation=3)[0, c, c])))(x)
  reach = np.abs(np.asarray(grad))[0].max(axis=-1)
  inside = np.zeros((N, N), bool)
  inside[c - 11:c + 12, c - 11:c + 12] = True                   # 23 × 23 around the centre
  assert np.all(reach[inside] > 0)
  assert np.all(reach[~inside] == 0)


def test_the_two_depthwise_kernels_are_one_large_kernel():
  """Away from the border (where the intermediate map's zero padding does not enter), DW-D-Conv ∘
  DW-Conv equals one 23×23 depthwise convolution whose kernel is the full convolution of the two."""
  rng = np.random.default_rng(2)
  C, N, d = 2, 27, 3
  a = rng.standard_normal((5, 5, C))
  b = rng.standard_normal((7, 7, C))
  big = np.zeros((23, 23, C))
  for p in range(5):
    for q in range(5):
      for m in range(7):
        for n in range(7):
          big[p + d * m, q + d * n] += a[p, q] * b[m, n]
  x = F32(rng.standard_normal((1, N, N, C)))
  two = conv2d.depthwise_conv2d(conv2d.depthwise_conv2d(x, F32(a[:, :, None])), F32(b[:, :, None]),
                                dilation=d)
  one = conv2d.depthwise_conv2d(x, F32(big[:, :, None]))
  inner = slice(9, N - 9)                                       # the dilated kernel's reach: 9
  np.testing.assert_allclose(two[:, inner, inner], one[:, inner, inner],
                             **tolerances.output(jnp.float32))


def test_the_layer_builds_the_papers_kernels_and_bad_shapes_are_clear_errors():
  params = conv.LargeKernelAttention().init(jax.random.PRNGKey(0), jnp.ones((1, 5, 5, 4)))["params"]
  assert params["dw_kernel"].shape == (5, 5, 1, 4) and params["dwd_kernel"].shape == (7, 7, 1, 4)
  bad = dict(jax.tree.map(jnp.asarray, params), pw_kernel=jnp.ones((1, 1, 4, 3)))
  with pytest.raises(ValueError, match="large_kernel_attention: `pw_kernel` must have shape"):
    conv.large_kernel_attention(jnp.ones((1, 5, 5, 4)), **bad)
  assert aj.get_module("large_kernel_attention").seeds == (60,)
