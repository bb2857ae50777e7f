"""Causal convolutions (CHELA, arXiv:2406.08128): the direct form equals a float64 loop, the FFT
form equals the direct one, and the stabilized long kernel has unit L1 norm (gain at most 1).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np

from attnjax.core import conv
from tests import tolerances

TOL = tolerances.output(jnp.float32)


def test_fft_convolution_equals_direct():
  x = jax.random.normal(jax.random.PRNGKey(10), (2, 21, 2, 3))
  kern = conv.stabilized_long_kernel(jax.random.normal(jax.random.PRNGKey(11), (2, 3, 8)),
                                   jnp.full((2, 3), -1.0))
  # The stabilized kernel has unit L1 norm per channel: the convolution's gain is at most 1.
  np.testing.assert_allclose(np.abs(np.asarray(kern)).sum(-1), 1.0,
                             **tolerances.FEATURE_SUM[jnp.float32])
  direct = conv.causal_conv(x, kern)
  xs, ks = np.asarray(x, np.float64), np.asarray(kern, np.float64)
  loop = np.stack([sum(ks[..., l] * xs[:, t - l] for l in range(min(t + 1, 8)))
                   for t in range(21)], 1)
  chex.assert_trees_all_close(direct, loop, **TOL)
  chex.assert_trees_all_close(conv.causal_conv(x, kern, method="fft"), direct, **TOL)
