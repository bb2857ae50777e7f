"""CAPE (#103, arXiv:2304.14118): the parameter-guided block against a float64 rewrite (explicit
loops for the convolutions and the grouped convolution, numpy's FFT per channel pair for the
spectral branch); the spectral convolution keeps only its lowest modes; the PDE parameters steer the
output through the three channel-attention vectors and nowhere else; clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

import attnjax as aj
from attnjax.vision import channel
from tests import tolerances
from tests.vision.conv import reference

F32 = lambda a: jnp.asarray(a, jnp.float32)
B, H, W, C, P, F, K, M, POOL = 2, 8, 12, 3, 2, 8, 3, 2, 2


def _gelu(a):
  return 0.5 * a * (1.0 + special.erf(a / np.sqrt(2.0)))


def _weights(rng):
  h = F // 2
  n = lambda *shape: rng.standard_normal(shape) / np.sqrt(shape[0] if len(shape) > 1 else 1)
  w = {"w0": n(K, K, C, h) / K, "w_ad": n(K, K, 1, F) / K, "w_ac": n(h, F), "b_ac": n(F),
       "w_1": n(h, F), "b_1": n(F), "w_2": n(K, K, F, C) / K,
       "ln_scale": 1 + 0.2 * rng.standard_normal((H, W)), "ln_bias": 0.2 * rng.standard_normal((H, W))}
  for part in ("low_re", "low_im", "high_re", "high_im"):
    w[f"sc_{part}"] = rng.standard_normal((h, F, M, M)) / h
  for i in range(3):
    w.update({f"fc{i}a_w": n(P, h), f"fc{i}a_b": n(h), f"fc{i}b_w": n(h, F), f"fc{i}b_b": n(F)})
  return w


def _spectral(y, w):
  """Per (input, output) channel pair: rfft2, keep the corner modes, multiply, irfft2 (float64)."""
  Bn, Hn, Wn, ci = y.shape
  out = np.zeros((Bn, Hn, Wn, w["sc_low_re"].shape[1]))
  for b in range(Bn):
    for o in range(out.shape[-1]):
      spec = np.zeros((Hn, Wn // 2 + 1), complex)
      for i in range(ci):
        s = np.fft.rfft2(y[b, :, :, i])
        spec[:M, :M] += s[:M, :M] * (w["sc_low_re"][i, o] + 1j * w["sc_low_im"][i, o])
        spec[Hn - M:, :M] += s[Hn - M:, :M] * (w["sc_high_re"][i, o] + 1j * w["sc_high_im"][i, o])
      out[b, :, :, o] = np.fft.irfft2(spec, s=(Hn, Wn))
  return out


def _reference(x, p, w):
  e = p / (1.0 + p)
  a = [_gelu(e @ w[f"fc{i}a_w"] + w[f"fc{i}a_b"]) @ w[f"fc{i}b_w"] + w[f"fc{i}b_b"] for i in range(3)]
  g = lambda v: v[:, None, None, :]
  y = _gelu(reference.conv2d(x, w["w0"]))
  pooled = y.reshape(B, H // POOL, POOL, W // POOL, POOL, -1).mean(axis=(2, 4))
  y0 = np.repeat(np.repeat(_spectral(pooled, w), POOL, axis=1), POOL, axis=2) * g(a[0])
  y1 = (y @ w["w_ac"] + w["b_ac"]) * g(a[1])
  y2 = np.stack([reference.depthwise(y[..., o // 2:o // 2 + 1], w["w_ad"][:, :, :, o])[..., 0]
                 for o in range(F)], axis=-1) * g(a[2])
  z = reference.conv2d(_gelu(y0 + y1 + y2 + y @ w["w_1"] + w["b_1"]), w["w_2"])
  mean, var = z.mean(axis=(1, 2), keepdims=True), z.var(axis=(1, 2), keepdims=True)
  ln = ((z - mean) / np.sqrt(var + 1e-5) * w["ln_scale"][None, :, :, None]
        + w["ln_bias"][None, :, :, None])
  return x * (1.0 + ln)


def _call(x, p, w, **kw):
  return channel.pde_parameter_channel_attention(F32(x), F32(p), **{k: F32(v) for k, v in w.items()},
                                                 pool=POOL, **kw)


def test_matches_float64_reference():
  rng = np.random.default_rng(0)
  w = _weights(rng)
  x, p = rng.standard_normal((B, H, W, C)), np.exp(rng.standard_normal((B, P)))
  np.testing.assert_allclose(_call(x, p, w), _reference(x, p, w), **tolerances.output(jnp.float32))


def test_spectral_convolution_keeps_only_the_lowest_modes():
  rng = np.random.default_rng(1)
  w = _weights(rng)
  y = rng.standard_normal((1, 10, 9, F // 2))
  out = np.asarray(channel.spectral_conv2d(F32(y), *(F32(w[f"sc_{n}"]) for n in
                                                      ("low_re", "low_im", "high_re", "high_im"))))
  spec = np.fft.rfft2(np.moveaxis(out, -1, 1))                      # [1, F, 10, 5]
  kept = np.zeros(spec.shape[-2:], bool)
  kept[:M, :M] = kept[-M:, :M] = True
  # A real output's spectrum is Hermitian along the rows in column 0: rows H-M and M are one
  # conjugate pair there, so the kept row H-M also shows at row M (as in FNO's own layer).
  kept[(-np.arange(kept.shape[0])) % kept.shape[0], 0] |= kept[:, 0]
  # Outside the kept modes: float32 round-off of the FFT round trip only.
  assert np.abs(spec[..., ~kept]).max() < tolerances.output(jnp.float32)["rtol"] * np.abs(spec).max()
  np.testing.assert_allclose(out, _spectral(y, w), **tolerances.output(jnp.float32))


def test_pde_parameters_steer_the_output_only_through_the_channel_attention():
  rng = np.random.default_rng(2)
  w = _weights(rng)
  x = rng.standard_normal((B, H, W, C))
  p1, p2 = np.full((B, P), 0.1), np.full((B, P), 10.0)
  assert tolerances.rel_rms(_call(x, p1, w), _call(x, p2, w)) > tolerances.CHANGED_REL_RMS
  # Attention vectors zeroed (their last layers' weights and biases): the branches vanish, and the
  # parameters no longer reach the output.
  silent = dict(w, **{f"fc{i}b_{t}": 0 * w[f"fc{i}b_{t}"] for i in range(3) for t in ("w", "b")})
  np.testing.assert_array_equal(_call(x, p1, silent), _call(x, p2, silent))
  np.testing.assert_allclose(_call(x, p1, silent), _reference(x, p1, silent),
                             **tolerances.output(jnp.float32))


def test_linen_defaults_are_the_papers_block():
  layer = aj.get_module("pde_parameter_channel_attention").linen()
  assert (layer.widening_factor, layer.kernel_size, layer.modes, layer.pool) == (16, 5, 9, 4)
  x, p = jax.ShapeDtypeStruct((1, 64, 64, 2), jnp.float32), jax.ShapeDtypeStruct((1, 3), jnp.float32)
  shapes = jax.eval_shape(layer.init, jax.random.PRNGKey(0), x, p)
  assert shapes["params"]["sc_low_re"].shape == (8, 16, 9, 9)
  assert shapes["params"]["ln_scale"].shape == (64, 64)
  assert jax.eval_shape(layer.apply, shapes, x, p).shape == (1, 64, 64, 2)


def test_bad_inputs_are_clear_errors():
  rng = np.random.default_rng(3)
  w = _weights(rng)
  x, p = rng.standard_normal((B, H, W, C)), np.ones((B, P))
  with pytest.raises(ValueError, match="`pde_params` must be \\[B, P\\]"):
    _call(x, p[:1], w)
  with pytest.raises(ValueError, match="must be multiples of `pool` = 3"):
    channel.pde_parameter_channel_attention(F32(x), F32(p), **{k: F32(v) for k, v in w.items()},
                                            pool=3)
  with pytest.raises(ValueError, match="spectral modes need"):
    _call(x, p, dict(w, **{f"sc_{n}": np.ones((F // 2, F, 5, 5))
                           for n in ("low_re", "low_im", "high_re", "high_im")}))
