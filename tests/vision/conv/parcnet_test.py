"""ParCNetV2's oversized convolution in a bifurcate gate (#182, arXiv:2211.07157): the mixer against a
float64 rewrite; every output sees the whole map (gradient test); and the oversized kernel is
position-dependent (the implicit positional encoding): a constant input gives a different value at
every position, and a circular shift of the input does not circularly shift the output."""

import jax
import jax.numpy as jnp
import numpy as np
from scipy import special

from attnjax.vision import conv
from tests import tolerances
from tests.vision.conv import reference

F32 = lambda a: jnp.asarray(a, jnp.float32)


def _weights(rng, C, H, W, E=None, k=3):
  E = E or C
  return dict(pw1_kernel=rng.standard_normal((C, 2 * E)) / np.sqrt(C),
              pw1_bias=rng.standard_normal(2 * E), h_kernel=rng.standard_normal((2 * H - 1, E)),
              w_kernel=rng.standard_normal((2 * W - 1, E)),
              local_kernel=rng.standard_normal((k, k, 1, E)), pw2_kernel=rng.standard_normal((E, C)))


def _mixer(x, w):
  return conv.oversized_conv_bifurcate_gate(F32(x), **{n: F32(a) for n, a in w.items()})


def test_against_float64():
  rng = np.random.default_rng(0)
  B, H, W, C = 2, 4, 5, 3
  x = rng.standard_normal((B, H, W, C))
  w = _weights(rng, C, H, W)
  uv = x @ w["pw1_kernel"] + w["pw1_bias"]
  u, v = uv[..., :C], uv[..., C:]
  g = 0.5 * v * (1 + special.erf(v / np.sqrt(2)))
  kh, kw = 2 * H - 1, 2 * W - 1
  big = np.zeros((B, H, W, C))                                  # explicit global sums
  gh = np.zeros((B, H, W, C))
  for i in range(H):
    for i2 in range(H):
      gh[:, i] += w["h_kernel"][i2 - i + kh // 2] * g[:, i2]
  for j in range(W):
    for j2 in range(W):
      big[:, :, j] += w["w_kernel"][j2 - j + kw // 2] * gh[:, :, j2]
  a = big + reference.depthwise(g, w["local_kernel"][:, :, 0])
  np.testing.assert_allclose(_mixer(x, w), (u * a) @ w["pw2_kernel"],
                             **tolerances.output(jnp.float32))


def test_every_output_sees_the_whole_map():
  rng = np.random.default_rng(1)
  H, W, C = 7, 9, 2
  w = _weights(rng, C, H, W)
  x = rng.standard_normal((1, H, W, C))
  for i, j in ((0, 0), (H - 1, W - 1), (3, 4)):
    reach = lambda w: np.abs(np.asarray(jax.grad(
        lambda x: jnp.sum(_mixer(x, w)[0, i, j]))(F32(x)))).max(axis=-1)[0]
    assert np.all(reach(w) > 0), (i, j)
    # Without the oversized kernels only the 3×3 local window is seen: the test can fail.
    local = reach({**w, "h_kernel": 0 * w["h_kernel"], "w_kernel": 0 * w["w_kernel"]})
    assert np.count_nonzero(local) <= 9


def test_oversized_kernel_encodes_position():
  rng = np.random.default_rng(2)
  H, W, E = 5, 6, 2
  h, wk = F32(rng.standard_normal((2 * H - 1, E))), F32(rng.standard_normal((2 * W - 1, E)))
  flat = np.asarray(conv.oversized_conv(jnp.ones((1, H, W, E)), h, wk))[0]
  for e in range(E):                                            # all H·W outputs differ
    vals = np.sort(flat[..., e].ravel())
    assert np.min(np.diff(vals)) > tolerances.DISTINCT_MIN_ABS
  x = F32(rng.standard_normal((1, H, W, E)))
  y = conv.oversized_conv(x, h, wk)
  rolled = conv.oversized_conv(jnp.roll(x, 1, axis=2), h, wk)
  assert tolerances.rel_rms(rolled, jnp.roll(y, 1, axis=2)) > tolerances.STRONG_CHANGE_REL_RMS


def test_default_kernels_are_twice_the_input():
  params = conv.OversizedConvBifurcateGate().init(jax.random.PRNGKey(0),
                                                   jnp.ones((1, 9, 11, 16)))["params"]
  assert params["h_kernel"].shape == (17, 16) and params["w_kernel"].shape == (21, 16)
  assert params["pw1_kernel"].shape == (16, 32) and params["pw2_kernel"].shape == (16, 16)
