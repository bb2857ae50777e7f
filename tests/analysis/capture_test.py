"""Capturing attention maps from any project model in its one forward: a decoder LM's and a ViT's
layers in order, weights equal to an explicit softmax of the layer's own q·k (causal rows zero past
the query), logits -inf where masked, the forward's output unchanged, and no capture when the
collection is not mutable."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from attnjax import analysis
from attnjax import models
from attnjax.data.base import TaskSpec
from attnjax.nn.attention import MultiHeadAttention
from tests import tolerances


def _lm():
  config = ml_collections.ConfigDict(dict(arch="decoder_lm", width=16, depth=3, num_heads=2,
                                          mlp_dim=32))
  spec = TaskSpec(name="t", kind="lm", input_shape=(7,), input_dtype="int32", vocab_size=11,
                  num_classes=11, seq_len=7)
  model = models.build_model(config, spec)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 11, (2, 7)), jnp.int32)
  return model, model.init(jax.random.PRNGKey(0), tokens), tokens


def test_decoder_layers_are_captured_in_order_and_causal():
  model, variables, tokens = _lm()
  maps = analysis.capture(model, variables, tokens)
  assert maps.weights.shape == (3, 2, 2, 7, 7) and len(maps.paths) == 3
  assert [p.split("/")[0] for p in maps.paths] == sorted(p.split("/")[0] for p in maps.paths)
  np.testing.assert_allclose(maps.weights.sum(-1), 1.0, **tolerances.output(jnp.float32))
  upper = np.triu(np.ones((7, 7), bool), 1)
  assert np.all(maps.weights[..., upper] == 0.0) and np.all(np.isneginf(maps.logits[..., upper]))
  np.testing.assert_allclose(maps.weights, jax.nn.softmax(maps.logits, axis=-1),
                             **tolerances.output(jnp.float32))
  # The forward is the same with and without capture.
  np.testing.assert_array_equal(model.apply(variables, tokens),
                                model.apply(variables, tokens, mutable=[analysis.CAPTURE])[0])


def test_weights_are_the_layers_softmax_of_q_k():
  layer = MultiHeadAttention(num_heads=2)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 5, 8)), jnp.float32)
  variables = layer.init(jax.random.PRNGKey(1), x)
  p = variables["params"]
  proj = lambda name: (np.einsum("btd,dnh->bnth", x, p[name]["kernel"])
                       + np.asarray(p[name]["bias"])[None, :, None, :])
  q, k = proj("query"), proj("key")
  logits = np.einsum("bnth,bnsh->bnts", q, k) / np.sqrt(4)
  expected = np.exp(logits - logits.max(-1, keepdims=True))
  expected /= expected.sum(-1, keepdims=True)
  maps = analysis.capture(layer, variables, x)
  np.testing.assert_allclose(maps.weights[0], expected, **tolerances.output(jnp.float32))


def test_nothing_is_sown_unless_asked():
  model, variables, tokens = _lm()
  _, state = model.apply(variables, tokens, mutable=["intermediates"])
  assert analysis.CAPTURE not in state
  with pytest.raises(ValueError, match="nothing was sown"):
    analysis.from_state({})
