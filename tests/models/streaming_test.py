"""StreamingLLM generation (arXiv:2309.17453): a fixed `sinks + window` cache per layer generates the
tokens of full recompute under the sinks + window mask, for prompts longer than the window, learned
or rotary positions, greedy and sampled; the layer's cache never grows."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from attnjax import models
from attnjax.core import masks
from attnjax.data.base import TaskSpec
from attnjax.models import streaming
from attnjax.nn import MultiHeadAttention
from tests import tolerances

V, P, NEW, SINKS, WINDOW = 29, 6, 9, 2, 4
SPEC = TaskSpec(name="toy_lm", kind="lm", input_shape=(P + NEW,), input_dtype="int32",
                vocab_size=V, num_classes=V, seq_len=P + NEW)
BASE = dict(arch="decoder_lm", width=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
            rope_base=10000.0, tie_embeddings=False)
CONFIGS = {"rope_gqa": {}, "learned_positions": dict(rope_base=None, position_embedding="learned")}


@functools.lru_cache(maxsize=None)
def _models(name):
  """The softmax model and the same parameters under the sinks + window mask (full recompute)."""
  cfg = {**BASE, **CONFIGS[name]}
  model = models.build_model(ml_collections.ConfigDict({**cfg, "mechanism": "softmax"}), SPEC)
  masked = models.build_model(ml_collections.ConfigDict(
      {**cfg, "mechanism": "flex",
       "mechanism_kwargs": {"mask_mod": masks.sink_window(SINKS, WINDOW)}}), SPEC)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), models.dummy_inputs(SPEC, 2))
  return model, masked, variables


@pytest.mark.parametrize("name,temperature", [("rope_gqa", 0.0), ("learned_positions", 0.0),
                                              ("rope_gqa", 1.0)])
def test_streaming_equals_full_recompute_under_the_sinks_and_window_mask(name, temperature):
  model, masked, variables = _models(name)
  prompt = np.random.default_rng(1).integers(0, V, (2, P)).astype(np.int32)
  kw = dict(rng=jax.random.PRNGKey(4), temperature=temperature)
  got = streaming.generate_streaming(model, variables, prompt, NEW, sinks=SINKS, window=WINDOW,
                                     **kw)
  want = models.generate(masked, variables, prompt, NEW, use_cache=False, **kw)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # Not ordinary attention: the full-cache softmax model continues differently.
  if temperature == 0.0 and name == "rope_gqa":
    assert not np.array_equal(np.asarray(got), np.asarray(models.generate(model, variables, prompt,
                                                                          NEW, **kw)))


def test_the_layer_cache_has_a_fixed_size_and_decodes_token_by_token():
  B, T, D = 2, 11, 16
  layer = MultiHeadAttention(num_heads=4, num_kv_heads=2, causal=True, rope_base=10000.0)
  x = jax.random.normal(jax.random.PRNGKey(0), (B, T, D))
  variables = layer.init(jax.random.PRNGKey(1), x)
  full = MultiHeadAttention(num_heads=4, num_kv_heads=2, causal=True, rope_base=10000.0,
                            mechanism="flex",
                            mechanism_kwargs={"mask_mod": masks.sink_window(SINKS, WINDOW)}
                            ).apply(variables, x)
  shapes = jax.eval_shape(lambda: layer.init(jax.random.PRNGKey(1), x[:, :1], decode=True))["cache"]
  cache = streaming.to_sink_window(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes),
                                   sinks=SINKS, window=WINDOW)
  step = jax.jit(lambda c, xt: layer.apply({**variables, "cache": c}, xt, decode=True,
                                           mutable=["cache"]))
  y, mutated = step(cache, x[:, :3])                       # a prefill chunk, then single tokens
  outs = [y]
  for t in range(3, T):
    y, mutated = step(mutated["cache"], x[:, t:t + 1])
    assert mutated["cache"]["sink_kv"].k.shape == (B, SINKS + WINDOW, 2, 4)
    outs.append(y)
  np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, axis=1)), np.asarray(full),
                             **tolerances.OUTPUT[jnp.float32])


def test_rejects_non_softmax_layers_and_bad_settings():
  model, masked, variables = _models("rope_gqa")
  prompt = np.zeros((1, 3), np.int32)
  with pytest.raises(ValueError, match="generate_streaming.*softmax.*flex"):
    streaming.generate_streaming(masked, variables, prompt, 2, sinks=1, window=2,
                                 rng=jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="generate_streaming.*window"):
    streaming.generate_streaming(model, variables, prompt, 2, sinks=1, window=0,
                                 rng=jax.random.PRNGKey(0))
