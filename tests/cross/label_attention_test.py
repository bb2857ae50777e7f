"""Label attention layer (arXiv:1911.03875) against a numpy loop of the authors' LabelAttention
(query vectors, sqrt(d_model) temperature, label vectors added to every word, reduce projection,
the parser's layer norm); each label's weights sum to one over the unmasked words and ignore
padding; a word's output changes only through itself and the label vectors (all words share them)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.cross import label_attention as lal
from tests import tolerances

B, T, D, L, DK, P = 2, 6, 5, 3, 4, 2


def _params(seed=0):
  layer = lal.LabelAttention(num_labels=L, d_kv=DK, d_proj=P)
  x = np.zeros((B, T, D), np.float32)
  params = layer.init(jax.random.PRNGKey(seed), x)["params"]
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(np.asarray(v) + 0.3 * rng.normal(size=v.shape), jnp.float32)
          for k, v in params.items()}


def _np_lal(x, mask, p):
  p = {k: np.asarray(v, np.float64) for k, v in p.items()}
  out = np.zeros((B, T, L * P))
  weights = np.zeros((B, L, T))
  for b in range(B):
    for lab in range(L):
      k = x[b] @ p["key"][lab]
      v = x[b] @ p["value"][lab]
      s = k @ p["query"][lab] / np.sqrt(D)
      s = np.where(mask[b], s, -np.inf)
      a = np.exp(s - s.max())
      a /= a.sum()
      weights[b, lab] = a
      o = (a @ v) @ p["out"]
      for t in range(T):
        z = (o + x[b, t]) @ p["reduce"]
        z = (z - z.mean()) / (z.std(ddof=1) + 1e-3) * p["norm_scale"] + p["norm_bias"]
        out[b, t, lab * P:(lab + 1) * P] = z
  return out, weights


def test_matches_numpy_loop_and_weights_are_distributions():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(B, T, D)).astype(np.float32)
  mask = np.ones((B, T), bool)
  mask[1, 4:] = False
  p = _params()
  y, a = lal.label_attention(x, mask, **p, return_weights=True)
  want_y, want_a = _np_lal(x.astype(np.float64), mask, p)
  np.testing.assert_allclose(y, want_y, **tolerances.OUTPUT[jnp.float32])
  np.testing.assert_allclose(a, want_a, **tolerances.OUTPUT[jnp.float32])
  np.testing.assert_allclose(np.asarray(a).sum(-1), 1.0, **tolerances.OUTPUT[jnp.float32])
  x2 = x.copy()
  x2[1, 4:] += 5.0   # padding words: the labels' vectors do not move
  y2 = np.asarray(lal.label_attention(x2, mask, **p))
  np.testing.assert_allclose(y2[1, :4], np.asarray(y)[1, :4], **tolerances.OUTPUT[jnp.float32])


def test_words_share_the_label_vectors():
  """Two words with the same features get the same output, wherever they are: the label vectors
  carry the sentence, the word adds only itself (no word-to-word attention)."""
  x = np.random.default_rng(2).normal(size=(B, T, D)).astype(np.float32)
  x[:, 4] = x[:, 1]
  y = np.asarray(lal.label_attention(x, None, **_params()))
  np.testing.assert_allclose(y[:, 4], y[:, 1], **tolerances.OUTPUT[jnp.float32])
  assert tolerances.rel_rms(y[:, 2], y[:, 1]) > tolerances.CHANGED_REL_RMS


def test_errors_name_the_argument():
  p = _params()
  with pytest.raises(ValueError, match="`mask`"):
    lal.label_attention(np.zeros((B, T, D), np.float32), np.ones((B, T + 1), bool), **p)
  with pytest.raises(ValueError, match="`key`"):
    lal.label_attention(np.zeros((B, T, D + 1), np.float32), None, **p)
