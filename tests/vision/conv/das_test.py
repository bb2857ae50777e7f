"""DAS (#120, arXiv:2311.12091): the gate against a float64 rewrite with bilinear sampling written as
explicit loops; with zero offsets the deformable convolution is the plain convolution; bilinear
sampling at integer offsets is a shift (zero filled); the gate lies in (0, 1)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.core import conv2d
from attnjax.vision import conv
from tests import tolerances
from tests.vision.conv import reference

F32 = lambda a: jnp.asarray(a, jnp.float32)


def _bilinear(z, y, x):
  """z [H, W, C] at the real point (y, x), zero outside: the four corners, explicit."""
  H, W, _ = z.shape
  y0, x0 = int(np.floor(y)), int(np.floor(x))
  out = np.zeros(z.shape[-1])
  for yc in (y0, y0 + 1):
    for xc in (x0, x0 + 1):
      if 0 <= yc < H and 0 <= xc < W:
        out += (1 - abs(y - yc)) * (1 - abs(x - xc)) * z[yc, xc]
  return out


def _deform(z, offsets, kernel, bias):
  B, H, W, _ = z.shape
  k = kernel.shape[0]
  y = np.zeros((B, H, W, kernel.shape[-1]))
  for b in range(B):
    for i in range(H):
      for j in range(W):
        for t in range(k * k):
          a, c = divmod(t, k)
          dy, dx = offsets[b, i, j, 2 * t], offsets[b, i, j, 2 * t + 1]
          y[b, i, j] += _bilinear(z[b], i + a - k // 2 + dy, j + c - k // 2 + dx) @ kernel[a, c]
  return y + bias


def _norm(v, axes):
  mean = v.mean(axis=axes, keepdims=True)
  return (v - mean) / np.sqrt(((v - mean) ** 2).mean(axis=axes, keepdims=True) + 1e-5)


def test_against_float64():
  rng = np.random.default_rng(0)
  B, H, W, C, D = 2, 4, 5, 3, 2
  x = rng.standard_normal((B, H, W, C))
  w = dict(dw_kernel=rng.standard_normal((3, 3, 1, C)), pw_kernel=rng.standard_normal((1, 1, C, D)),
           offset_kernel=rng.standard_normal((3, 3, D, 18)), offset_bias=rng.standard_normal(18),
           deform_kernel=rng.standard_normal((3, 3, D, C)), deform_bias=rng.standard_normal(C),
           ln_scale=rng.standard_normal(C), ln_bias=rng.standard_normal(C))
  y, gate = conv.deformable_attention_gate(F32(x), **{n: F32(a) for n, a in w.items()},
                                           return_gate=True)
  z = _norm(reference.conv2d(reference.depthwise(x, w["dw_kernel"][:, :, 0]), w["pw_kernel"]),
            (1, 2))
  offsets = reference.conv2d(z, w["offset_kernel"], w["offset_bias"])
  d = _deform(z, offsets, w["deform_kernel"], w["deform_bias"])
  want = 1 / (1 + np.exp(-(_norm(d, (-1,)) * w["ln_scale"] + w["ln_bias"])))
  # The offsets are O(1) reals: the sampling points fall between pixels and past the border.
  assert np.mean(np.abs(offsets - np.round(offsets))) > 0.1
  np.testing.assert_allclose(gate, want, **tolerances.output(jnp.float32))
  np.testing.assert_allclose(y, x * want, **tolerances.output(jnp.float32))
  assert np.all((np.asarray(gate) > 0) & (np.asarray(gate) < 1))


def test_zero_offsets_give_the_plain_convolution():
  rng = np.random.default_rng(1)
  z = F32(rng.standard_normal((2, 5, 6, 3)))
  kernel, bias = F32(rng.standard_normal((3, 3, 3, 4))), F32(rng.standard_normal(4))
  got = conv.deformable_conv2d(z, jnp.zeros((2, 5, 6, 18)), kernel, bias)
  np.testing.assert_allclose(got, conv2d.conv2d(z, kernel, bias), **tolerances.output(jnp.float32))


@pytest.mark.parametrize("dy,dx", [(1, -2), (-1, 0), (2, 3)])
def test_bilinear_sampling_at_integer_offsets_is_a_shift(dy, dx):
  rng = np.random.default_rng(2)
  B, H, W, C = 1, 5, 6, 2
  z = rng.standard_normal((B, H, W, C))
  i, j = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
  py = jnp.asarray((i + dy)[None, :, :, None], jnp.float32)
  px = jnp.asarray((j + dx)[None, :, :, None], jnp.float32)
  got = np.asarray(conv.bilinear_sample(F32(z), py, px))[..., 0, :]
  shifted = np.zeros_like(z)                                    # shifted[i, j] = z[i + dy, j + dx]
  for a in range(H):
    for c in range(W):
      if 0 <= a + dy < H and 0 <= c + dx < W:
        shifted[:, a, c] = z[:, a + dy, c + dx]
  np.testing.assert_allclose(got, shifted, **tolerances.output(jnp.float32))


def test_offsets_move_the_taps():
  """A half-pixel offset reads the mean of two neighbours: the sampling is not the plain tap."""
  z = F32(np.arange(12.0).reshape(1, 3, 4, 1))
  got = conv.bilinear_sample(z, jnp.full((1, 1, 1, 1), 1.0), jnp.full((1, 1, 1, 1), 1.5))
  assert float(got[0, 0, 0, 0, 0]) == pytest.approx((5.0 + 6.0) / 2)


def test_bad_shapes_are_clear_errors():
  params = conv.DeformableAttentionGate().init(jax.random.PRNGKey(0), jnp.ones((1, 4, 4, 4)))
  params = dict(params["params"])
  params["offset_kernel"] = jnp.ones((3, 3, 4, 9))
  with pytest.raises(ValueError, match="deformable_attention_gate: `offset_kernel` must have shape"):
    conv.deformable_attention_gate(jnp.ones((1, 4, 4, 4)), **params)
