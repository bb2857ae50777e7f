"""DecoderLM: logits shapes and dtype, causality, tied logits formula, learned positions, and the
decode mode (prefill + one token at a time through the KV caches) equal to the full forward."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import pytest

from attnjax import models
from attnjax.data.base import TaskSpec
from tests import tolerances

B, T, V = 2, 12, 40
SPEC = TaskSpec(name="toy_lm", kind="lm", input_shape=(T,), input_dtype="int32", vocab_size=V,
                num_classes=V, seq_len=T)
TOL = tolerances.output(jnp.float32)


def _model(spec=SPEC, **overrides):
  config = dict(arch="decoder_lm", width=32, depth=2, num_heads=4, mlp_dim=64,
                mechanism="softmax", rope_base=10000.0, tie_embeddings=True)
  return models.build_model(ml_collections.ConfigDict({**config, **overrides}), spec)


def _tokens(seed=0, shape=(B, T)):
  return jax.random.randint(jax.random.PRNGKey(seed), shape, 0, V, jnp.int32)


def _init_apply(model, tokens):
  return jax.jit(lambda t: (lambda v: (v, model.apply(v, t)))(
      model.init(jax.random.PRNGKey(0), t)))(tokens)


def test_logits_shape_dtype_and_causality():
  model = _model()
  tokens = _tokens()
  variables, logits = _init_apply(model, tokens)
  chex.assert_shape(logits, (B, T, V))
  assert logits.dtype == jnp.float32
  chex.assert_tree_all_finite(logits)
  changed = tokens.at[:, 7:].set(_tokens(seed=1)[:, 7:])
  logits2 = jax.jit(model.apply)(variables, changed)
  chex.assert_trees_all_close(logits2[:, :7], logits[:, :7], **TOL)
  assert float(jnp.max(jnp.abs(logits2[:, 7:] - logits[:, 7:]))) > tolerances.CHANGED_MAX_ABS


def test_tied_logits_are_hidden_states_times_embedding():
  model = _model()
  tokens = _tokens()
  variables, logits = _init_apply(model, tokens)
  _, state = jax.jit(lambda v, t: model.apply(v, t, capture_intermediates=True))(variables, tokens)
  hidden = state["intermediates"]["decoder"]["__call__"][0]
  embedding = nn.unbox(variables)["params"]["embed"]["embedding"]
  chex.assert_trees_all_close(logits, hidden @ embedding.T / jnp.sqrt(32.0), **TOL)


def test_untied_head_with_other_output_size():
  spec = TaskSpec(name="tagger", kind="lm", input_shape=(T,), input_dtype="int32", vocab_size=V,
                  num_classes=7, seq_len=T)
  variables, logits = _init_apply(_model(spec, tie_embeddings=False), _tokens())
  chex.assert_shape(logits, (B, T, 7))
  chex.assert_shape(nn.unbox(variables)["params"]["logits"]["kernel"], (32, 7))


def _decode_logits(model, variables, tokens, prefill):
  """Logits from a prefill of `prefill` tokens then one token per call, via the 'cache'."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens, decode=True))["cache"]
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  step = jax.jit(lambda cache, t: model.apply({**variables, "cache": cache}, t, decode=True,
                                              mutable=["cache"]))
  out, mutated = step(cache, tokens[:, :prefill])
  outs, cache = [out], mutated["cache"]
  for t in range(prefill, tokens.shape[1]):
    out, mutated = step(cache, tokens[:, t:t + 1])
    outs.append(out)
    cache = mutated["cache"]
  return jnp.concatenate(outs, axis=1)


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(num_kv_heads=2, mechanism="sliding_window", mechanism_kwargs={"window": 4},
         layer_mechanisms="every 2: softmax"),
    dict(rope_base=None, position_embedding="learned", mlp="swiglu", tie_embeddings=False),
    dict(mechanism="lightning_attention_2", num_kv_heads=2),
], ids=["softmax_rope", "hybrid_gqa", "learned_positions", "linear"])
def test_decode_with_cache_equals_full_forward(overrides):
  model = _model(**overrides)
  tokens = _tokens()
  variables, full = _init_apply(model, tokens)
  chex.assert_trees_all_close(_decode_logits(model, variables, tokens, prefill=5), full, **TOL)


def test_learned_positions_need_max_len():
  model = _model(rope_base=None, position_embedding="learned")
  variables, _ = _init_apply(model, _tokens())
  chex.assert_shape(nn.unbox(variables)["params"]["pos_embed"], (T, 32))
  with pytest.raises(ValueError, match="max_len"):
    jax.eval_shape(model.apply, variables, _tokens(shape=(B, T + 1)))
