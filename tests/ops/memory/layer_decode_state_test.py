"""The Flax layer decodes Mega, SHA-RNN attention and the Recurrent Attention Network from their
fixed-size recurrent state: its cache is that state (the registry's `state_size` numbers per
sequence, not a KV cache), sized independently of the length it was initialized on, and a prefill
followed by single tokens gives the layer's full causal forward."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import attnjax as aj
from attnjax.nn import MultiHeadAttention
from tests import inputs
from tests import tolerances

B, T, D, N, KV = 2, 11, 32, 4, 2
# Settings that bound each state (a chunk, a memory, a window) shorter than T, so decoding crosses
# their boundaries.
SETTINGS = {"mega_attention": {"chunk_size": 4}, "sha_rnn_attention": {"memory": 3},
            "recurrent_attention_network": {"window": 4}}
PREFILL = 5   # crosses position 4; then one token at a time


def _layer(name, **settings):
  return MultiHeadAttention(num_heads=N, num_kv_heads=KV, mechanism=name,
                            mechanism_kwargs=settings, causal=True, rope_base=10000.0,
                            bias_init=nn.initializers.normal(0.1))


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_layer_decodes_from_the_fixed_size_state(name):
  layer = _layer(name, **SETTINGS[name])
  x = jax.random.normal(jax.random.PRNGKey(0), (B, T, D), jnp.float32)
  # Every learned array moved off its initializer, so zero biases and unit scales take part.
  params = inputs.perturbed(jax.jit(layer.init)(jax.random.PRNGKey(1), x))
  full = jax.jit(layer.apply)(params, x)
  # The cache is sized on 3 tokens: the state does not depend on the length.
  cache = jax.eval_shape(lambda x: layer.init(jax.random.PRNGKey(1), x[:, :3], decode=True),
                         x)["cache"]
  assert set(cache) == {"state", "cache_index"}
  floats = sum(leaf.size for leaf in jax.tree.leaves(cache["state"])) // B
  mech = aj.get_mechanism(name)
  assert floats == mech.decode_state_floats(T, N, KV, D // N, D // N, SETTINGS[name])
  step = jax.jit(lambda cache, xs: layer.apply({**params, "cache": cache}, xs, decode=True,
                                               mutable=["cache"]))
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache)
  outs, start = [], 0
  for size in (PREFILL,) + (1,) * (T - PREFILL):
    out, mutated = step(cache, x[:, start:start + size])
    chex.assert_trees_all_equal_shapes(mutated["cache"], cache)
    outs.append(out)
    cache, start = mutated["cache"], start + size
  assert int(cache["cache_index"]) == T
  chex.assert_trees_all_close(jnp.concatenate(outs, axis=1), full,
                              **tolerances.output(jnp.float32))


@pytest.mark.parametrize("name", ["mega_attention", "sha_rnn_attention"])
def test_an_unbounded_setting_decodes_over_a_kv_cache(name):
  """Unchunked Mega (its default) and SHA-RNN attention with an unbounded memory have no fixed-size
  state (`Mechanism.recurrent_for` is False): the layer keeps a KV cache and decodes over it."""
  unbounded = {"chunk_size": None} if name == "mega_attention" else {"memory": None}
  assert not aj.get_mechanism(name).recurrent_for(unbounded)
  layer = _layer(name, **unbounded)
  x = jax.random.normal(jax.random.PRNGKey(0), (B, T, D), jnp.float32)
  params = inputs.perturbed(jax.jit(layer.init)(jax.random.PRNGKey(1), x))
  full = jax.jit(layer.apply)(params, x)
  cache = jax.eval_shape(lambda x: layer.init(jax.random.PRNGKey(1), x, decode=True), x)["cache"]
  assert "cached_key" in cache and "state" not in cache
  step = jax.jit(lambda cache, xs: layer.apply({**params, "cache": cache}, xs, decode=True,
                                               mutable=["cache"]))
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache)
  out, mutated = step(cache, x[:, :PREFILL])
  outs = [out]
  for t in range(PREFILL, T):
    out, mutated = step(mutated["cache"], x[:, t:t + 1])
    outs.append(out)
  chex.assert_trees_all_close(jnp.concatenate(outs, axis=1), full,
                              **tolerances.output(jnp.float32))
