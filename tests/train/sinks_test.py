"""attnjax.analysis.sinks (behind experiments/sinks.py) reads each layer's attention weights by
probing its mechanism with one-hot values: the probe must return the weights themselves (softmax
against `attention_weights` on the layer's own queries and keys; ReLA's shares against its ReLU
weights despite the RMSNorm)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import attnjax as aj
from attnjax import models
from attnjax.data import base
from attnjax.ops.positional import rope
from attnjax.analysis import sinks
from tests import tolerances

T, V = 12, 50
SPEC = base.TaskSpec(name="toy", kind="lm", input_shape=(T,), input_dtype="int32", vocab_size=V,
                     num_classes=V, seq_len=T)


def _model(mechanism):
  config = ml_collections.ConfigDict(dict(arch="decoder_lm", width=32, depth=2, num_heads=4,
                                          mechanism=mechanism, rope_base=10000.0,
                                          position_embedding="none"))
  return models.build_model(config, SPEC)


@pytest.mark.parametrize("mechanism", ["softmax", "rectified_linear_attention"])
def test_probe_returns_each_layers_weights(mechanism):
  model = _model(mechanism)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, T), 0, V)
  variables = model.init(jax.random.PRNGKey(1), tokens)
  calls = sinks.recorded_attention_inputs(model, variables, tokens)
  assert len(calls) == 2
  for module, path, x in calls:
    p = sinks.layer_params_at(variables["params"], path)
    w = sinks.attention_probe(module, p, x)
    project = lambda name: rope.apply_rope(
        jnp.einsum("btd,dnh->btnh", x, p[name]["kernel"]) + p[name]["bias"], jnp.arange(T),
        base=10000.0)
    q, k = project("query"), project("key")
    if mechanism == "softmax":
      want, _ = aj.attention_weights(q, k, mask_mod=aj.masks.causal())
      np.testing.assert_allclose(w, want, **tolerances.output(jnp.float32))
    else:
      relu, _ = aj.attention_weights(q, k, mask_mod=aj.masks.causal(), normalizer="relu")
      share = lambda a: a / jnp.maximum(a.sum(-1, keepdims=True), 1e-30)
      np.testing.assert_allclose(share(w), share(relu), **tolerances.output(jnp.float32))
