"""Tests of attnjax.analysis.damro (#6): outlier selection and the contrastive logits."""

import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.analysis import damro
from tests import tolerances


def test_outliers_are_the_cls_attention_top_k():
  a = np.random.default_rng(1).random((2, 9))
  np.testing.assert_array_equal(damro.outlier_tokens(a, 3), np.argsort(-a, -1)[:, :3])
  with pytest.raises(ValueError, match=r"cls_attention must be \[B, P\]"):
    damro.outlier_tokens(a, 10)


def test_contrast_and_plausibility_constraint():
  rng = np.random.default_rng(1)
  zf, zo = rng.normal(size=(2, 6)).astype(np.float32), rng.normal(size=(2, 6)).astype(np.float32)
  got = np.asarray(damro.damro_logits(jnp.asarray(zf), jnp.asarray(zo), 0.5, 0.0))
  np.testing.assert_allclose(got, 1.5 * zf - 0.5 * zo, **tolerances.output(jnp.float32))
  np.testing.assert_allclose(damro.damro_logits(jnp.asarray(zf), jnp.asarray(zo), 0.0, 0.0), zf,
                             **tolerances.output(jnp.float32))
  p = np.exp(zf) / np.exp(zf).sum(-1, keepdims=True)
  cut = np.asarray(damro.damro_logits(jnp.asarray(zf), jnp.asarray(zo), 0.5, 0.5))
  implausible = p < 0.5 * p.max(-1, keepdims=True)
  assert implausible.any() and np.all(np.isneginf(cut[implausible]))
  np.testing.assert_allclose(cut[~implausible], (1.5 * zf - 0.5 * zo)[~implausible],
                             **tolerances.output(jnp.float32))
  with pytest.raises(ValueError, match="outlier_logits must be"):
    damro.damro_logits(jnp.asarray(zf), jnp.asarray(zo[:, :3]))
