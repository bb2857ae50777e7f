"""All-to-key attention (arXiv:2212.04105): against a numpy loop of the authors' A2K (region summaries
with the sigmoid similarity, the argmax region match, the uncovered border left to the biases);
progressive attention reads only the matched style region; bad shapes are clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.cross import all_to_key
from tests import tolerances

B, H, W, C, R = 2, 9, 11, 16, 4
HEADS, D = 8, 2


def _maps(seed=0):
  rng = np.random.default_rng(seed)
  content = rng.standard_normal((B, H, W, C)) + rng.standard_normal(C)
  return content.astype(np.float32), rng.standard_normal((B, H, W, C)).astype(np.float32)


def _params(seed=1):
  x, s = _maps()
  layer = all_to_key.AllToKeyAttention(region=R)
  params = layer.init(jax.random.PRNGKey(seed), x, s)["params"]
  rng = np.random.default_rng(seed)
  return {k: np.asarray(v, np.float64) + 0.2 * rng.standard_normal(np.shape(v))
          for k, v in params.items()}


def _np_a2k(x, s, p):
  x, s = np.asarray(x, np.float64), np.asarray(s, np.float64)
  norm = lambda a: (a - a.mean((0, 1))) / np.sqrt(a.var((0, 1), ddof=1) + 1e-5)  # noqa: E731
  proj = lambda n, a: a @ p[f"{n}_kernel"] + p.get(f"{n}_bias", 0.0)  # noqa: E731
  hb, wb = H // R, W // R
  out = np.zeros((B, H, W, C))
  for b in range(B):
    nc, ns = norm(x[b]), norm(s[b])
    maps = {n: proj(n, a) for n, a in (("q", nc), ("k", ns), ("v", s[b]), ("q2", nc), ("k2", ns),
                                       ("v2", s[b]))}
    # regions[n][x, y, c]: region x = (i // R)·wb + j // R, position y = (i % R)·R + j % R
    regions = {n: np.zeros((hb * wb, R * R, C)) for n in maps}
    for n, a in maps.items():
      for i in range(hb * R):
        for j in range(wb * R):
          regions[n][(i // R) * wb + j // R, (i % R) * R + j % R] = a[i, j]
    da, pa = np.zeros((hb * wb, R * R, C)), np.zeros((hb * wb, R * R, C))
    for h in range(HEADS):
      c = slice(h * D, (h + 1) * D)
      q, k, v = (regions[n][..., c] for n in ("q", "k", "v"))
      kc, vc = k.mean(1), v.mean(1)
      sim = 1 / (1 + np.exp(-(p["sim_beta"] + p["sim_alpha"] * np.einsum("xd,xyd->xy", kc, k))))
      k_agg = (np.einsum("xy,xyd->xd", sim, k) + kc) / (R * R + 1)
      v_agg = (np.einsum("xy,xyd->xd", sim, v) + vc) / (R * R + 1)
      logits = np.einsum("xyd,zd->xyz", q, k_agg)
      w = np.exp(logits - logits.max(-1, keepdims=True))
      da[..., c] = (w / w.sum(-1, keepdims=True)) @ v_agg
      q2, k2, v2 = (regions[n][..., c] for n in ("q2", "k2", "v2"))
      for xr in range(hb * wb):
        best = np.argmax([np.sum(q2[xr] * k2[z]) for z in range(hb * wb)])
        logits2 = q2[xr] @ k2[best].T
        w2 = np.exp(logits2 - logits2.max(-1, keepdims=True))
        pa[xr, :, c] = (w2 / w2.sum(-1, keepdims=True)) @ v2[best]
    grid_da, grid_pa = np.zeros((H, W, C)), np.zeros((H, W, C))
    for i in range(hb * R):
      for j in range(wb * R):
        grid_da[i, j] = da[(i // R) * wb + j // R, (i % R) * R + j % R]
        grid_pa[i, j] = pa[(i // R) * wb + j // R, (i % R) * R + j % R]
    out[b] = proj("fusion1", grid_da) + proj("fusion2", grid_pa) + x[b]
  return out


def _run(p, x, s):
  return all_to_key.all_to_key_attention(jnp.asarray(x), jnp.asarray(s), region=R, **{
      k: jnp.asarray(v, jnp.float32) for k, v in p.items()})


def test_matches_a_numpy_loop_of_the_authors_module():
  x, s = _maps(2)
  p = _params()
  np.testing.assert_allclose(np.asarray(_run(p, x, s)), _np_a2k(x, s, p),
                             **tolerances.KERNEL_VALUE[jnp.float32])


def test_uncovered_border_keeps_the_content_plus_the_fusion_biases():
  x, s = _maps(3)
  p = _params()
  out = np.asarray(_run(p, x, s))
  border = out[:, 2 * R:, :] - x[:, 2 * R:, :]
  np.testing.assert_allclose(border, np.broadcast_to(p["fusion1_bias"] + p["fusion2_bias"],
                                                     border.shape), **tolerances.output(jnp.float32))


def test_style_regions_are_read_wherever_they_lie():
  """Swapping two whole style regions moves no statistic (per-channel mean and variance, each region's
  summary) and the region match follows the moved region: the output is unchanged."""
  x, s = _maps(4)
  p = _params()
  swapped = s.copy()
  swapped[:, :R, :R], swapped[:, R:2 * R, R:2 * R] = s[:, R:2 * R, R:2 * R], s[:, :R, :R]
  np.testing.assert_allclose(np.asarray(_run(p, x, swapped)), np.asarray(_run(p, x, s)),
                             **tolerances.output(jnp.float32))
  # A change inside one region that moves its statistics does change the output.
  bumped = s.copy()
  bumped[:, :R, :R] += 2.0
  assert tolerances.rel_rms(_run(p, x, bumped), _run(p, x, s)) > tolerances.CHANGED_REL_RMS


def test_bad_inputs_are_clear_errors():
  x, s = _maps()
  p = _params()
  with pytest.raises(ValueError, match="style"):
    _run(p, x, s[:, :5])
  with pytest.raises(ValueError, match="region"):
    all_to_key.all_to_key_attention(jnp.asarray(x), jnp.asarray(s), region=12, **p)
