"""ELA (#50, arXiv:2403.01123): both positional gates against a float64 rewrite (explicit grouped
1-D convolution loops, GroupNorm, sigmoid), and the paper's claim of no dimensionality reduction: the
gates are [B, H, C] and [B, W, C] with all C channels kept."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.vision import channel
from tests import tolerances


def _branch(z, kernel, scale, bias, groups, num_groups, eps=1e-5):
  """z [B, L, C] -> sigmoid(GN(conv1d(z))), float64 loops."""
  B, L, C = z.shape
  k, cg, _ = kernel.shape
  out_per_group = C // groups
  conv = np.zeros((B, L, C))
  for o in range(C):
    g = o // out_per_group
    for t in range(L):
      for j in range(k):
        src = t + j - k // 2
        if 0 <= src < L:
          for i in range(cg):
            conv[:, t, o] += kernel[j, i, o] * z[:, src, g * cg + i]
  out = np.zeros_like(conv)
  per = C // num_groups
  for g in range(num_groups):
    block = conv[:, :, g * per:(g + 1) * per]
    mean = block.mean(axis=(1, 2), keepdims=True)
    var = ((block - mean) ** 2).mean(axis=(1, 2), keepdims=True)
    out[:, :, g * per:(g + 1) * per] = (block - mean) / np.sqrt(var + eps)
  return 1 / (1 + np.exp(-(out * scale + bias)))


@pytest.mark.parametrize("k,groups,num_groups", [(7, 16, 16), (5, 2, 4)])   # ELA-B; ELA-S-like
def test_gates_against_float64_without_channel_reduction(k, groups, num_groups):
  rng = np.random.default_rng(0)
  B, H, W, C = 2, 5, 6, 16
  x = rng.standard_normal((B, H, W, C))
  kernel = rng.standard_normal((k, C // groups, C)) * 0.3
  scale, bias = 1 + 0.2 * rng.standard_normal(C), 0.2 * rng.standard_normal(C)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  y, (gh, gw) = channel.ela_local_attention(f32(x), kernel=f32(kernel), gn_scale=f32(scale),
                                            gn_bias=f32(bias), num_groups=num_groups,
                                            return_gate=True)
  assert gh.shape == (B, H, C) and gw.shape == (B, W, C)          # no reduction: C kept
  want_h = _branch(x.mean(axis=2), kernel, scale, bias, groups, num_groups)
  want_w = _branch(x.mean(axis=1), kernel, scale, bias, groups, num_groups)
  np.testing.assert_allclose(gh, want_h, **tolerances.output(jnp.float32))
  np.testing.assert_allclose(gw, want_w, **tolerances.output(jnp.float32))
  want = x * want_h[:, :, None, :] * want_w[:, None, :, :]
  np.testing.assert_allclose(y, want, **tolerances.output(jnp.float32))


@pytest.mark.parametrize("variant,shape", [("B", (7, 1, 32)), ("T", (5, 1, 32)), ("S", (5, 8, 32)),
                                           ("L", (7, 8, 32))])
def test_variants_have_the_papers_kernels_and_no_reduction(variant, shape):
  x = jnp.ones((1, 3, 4, 32))
  params = channel.EfficientLocalAttention(variant=variant).init(jax.random.PRNGKey(0), x)["params"]
  assert jax.tree.map(jnp.shape, params) == {"kernel": shape, "gn_scale": (32,), "gn_bias": (32,)}


def test_bad_kernel_is_a_clear_error():
  with pytest.raises(ValueError, match="ela_local_attention: `kernel` must have shape"):
    channel.ela_local_attention(jnp.ones((1, 3, 3, 16)), kernel=jnp.ones((4, 1, 16)),
                                gn_scale=jnp.ones(16), gn_bias=jnp.zeros(16))
