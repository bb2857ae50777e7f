"""The Perceiver token classifier: finite logits per sequence, each sequence's independent of the
others in the batch, compiled FLOPs linear in the input length, and the training run returns finite
metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import data
from attnjax.models import perceiver_classifier as pc
from tests import tolerances

# Curvature of FLOPs in T relative to the slope (see tests/cross/perceiver_test.py).
LINEAR_CURVATURE_MAX = 0.02


def _model():
  return pc.PerceiverClassifier(vocab_size=16, num_classes=10, width=16, num_latents=4,
                                latent_dim=16, num_blocks=1, latent_layers=1, num_heads=2,
                                num_bands=4)


def test_logits_per_sequence():
  model = _model()
  tokens = np.zeros((2, 12), np.int32)
  tokens[0, :7] = [11, 3, 4, 12, 5, 15, 15]
  tokens[1, :5] = [13, 2, 9, 15, 1]
  params = model.init(jax.random.PRNGKey(0), tokens)["params"]
  logits = model.apply({"params": params}, tokens)
  assert logits.shape == (2, 10) and bool(jnp.all(jnp.isfinite(logits)))
  # Example 1 alone equals example 1 in the batch; changing example 0 leaves it.
  other = tokens.copy()
  other[0, :3] = [14, 1, 1]
  np.testing.assert_allclose(model.apply({"params": params}, other)[1], logits[1],
                             **tolerances.OUTPUT[jnp.float32])


@pytest.mark.slow   # the Perceiver block's linear cost is tests/cross/perceiver_test.py's, by default
def test_cost_is_linear_in_length():
  model = _model()
  lengths = (64, 128, 256)
  flops = []
  for t in lengths:
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, t), jnp.int32))["params"]
    flops.append(pc.forward_flops(model, params, (1, t)))
  slopes = np.diff(flops) / np.diff(lengths)
  assert abs(slopes[-1] - slopes[0]) / slopes[0] < LINEAR_CURVATURE_MAX, flops


def test_train_classifier_reports_finite_metrics():
  task = data.make_task({"name": "listops", "seq_len": 32, "max_depth": 3, "min_length": 4})
  r = pc.train_classifier(_model(), task, steps=3, batch_size=8, eval_examples=16)
  assert 0.0 <= r["eval_accuracy"] <= 1.0 and r["seconds_per_step"] > 0
  assert r["forward_gflops"] > 0 and r["params"] > 0
