"""LKCA (#88, arXiv:2401.05738): the large depthwise convolution against a float64 rewrite, and the
paper's equivalence: the convolution equals a static, translation-invariant local attention matrix
over the H·W tokens (built here from the kernel by explicit loops) applied to them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.vision import conv
from tests import tolerances
from tests.vision.conv import reference

F32 = lambda a: jnp.asarray(a, jnp.float32)


def _attention_matrix(kernel, H, W):
  """`A [C, H·W, H·W]`: query (i, j) gives key (i', j') the kernel's weight at their offset."""
  K, C = kernel.shape[0], kernel.shape[-1]
  r = K // 2
  A = np.zeros((C, H * W, H * W))
  for i in range(H):
    for j in range(W):
      for i2 in range(H):
        for j2 in range(W):
          if abs(i2 - i) <= r and abs(j2 - j) <= r:
            A[:, i * W + j, i2 * W + j2] = kernel[i2 - i + r, j2 - j + r, 0]
  return A


@pytest.mark.parametrize("K", [3, 7, 11])                       # 11 > H, W: a kernel past the map
def test_convolution_equals_static_local_attention(K):
  rng = np.random.default_rng(K)
  B, H, W, C = 2, 5, 6, 3
  x = rng.standard_normal((B, H, W, C))
  kernel, bias = rng.standard_normal((K, K, 1, C)), rng.standard_normal(C)
  y = conv.large_kernel_conv_attention(F32(x), kernel=F32(kernel), bias=F32(bias))
  np.testing.assert_allclose(y, reference.depthwise(x, kernel[:, :, 0], bias),
                             **tolerances.output(jnp.float32))
  A = _attention_matrix(kernel, H, W)
  np.testing.assert_allclose(conv.lkca_attention_matrix(F32(kernel), H, W), A,
                             **tolerances.output(jnp.float32))
  tokens = x.reshape(B, H * W, C)
  attended = np.einsum("cqk,bkc->bqc", A, tokens) + bias
  np.testing.assert_allclose(np.asarray(y).reshape(B, H * W, C), attended,
                             **tolerances.output(jnp.float32))


def test_attention_weights_depend_only_on_the_offset_and_vanish_past_the_kernel():
  rng = np.random.default_rng(0)
  kernel = F32(rng.standard_normal((3, 3, 1, 1)))
  A = np.asarray(conv.lkca_attention_matrix(kernel, 4, 5))[0]
  q, k = (1 * 5 + 1), (2 * 5 + 2)                               # (1, 1) -> (2, 2): offset (1, 1)
  assert A[q, k] == A[(2 * 5 + 3), (3 * 5 + 4)] == float(kernel[2, 2, 0, 0])
  assert A[0, 3 * 5 + 4] == 0.0                                 # offset (3, 4) is past r = 1


def test_bad_kernel_is_a_clear_error():
  with pytest.raises(ValueError, match="large_kernel_conv_attention: `kernel` must have shape"):
    conv.large_kernel_conv_attention(jnp.ones((1, 4, 4, 2)), kernel=jnp.ones((4, 4, 1, 2)),
                                     bias=jnp.ones(2))
  with pytest.raises(ValueError, match="`kernel_size` must be odd"):
    conv.LargeKernelConvAttention(kernel_size=4).init(jax.random.PRNGKey(0), jnp.ones((1, 4, 4, 2)))
