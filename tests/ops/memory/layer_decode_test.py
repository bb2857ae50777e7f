"""The Flax layer decodes Infini-attention, LAVO and CHELA with their fixed-size recurrent state:
prefill then single tokens through `MultiHeadAttention(decode=True)` equal its full causal forward,
and the cache is the state (the registry's `state_size` numbers per sequence), not a KV cache sized
on the input."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import attnjax as aj
from attnjax.nn import MultiHeadAttention
from tests import tolerances

B, T, D, N, KV = 2, 11, 16, 4, 2
TOL = tolerances.output(jnp.float32)

# Segments, windows and chunks shorter than T, so decoding crosses their ends.
CASES = {
    "infini_attention": dict(segment_length=3),
    "orthogonal_memory_attention": dict(window=3, num_bases=3, chunk_size=4),
    "chela_attention": dict(chunk_size=4),
}


@pytest.mark.parametrize("mechanism", sorted(CASES))
def test_layer_decodes_memory_mechanisms_with_their_recurrent_state(mechanism):
  """Prefill 4 tokens, then 7 single steps: the layer's outputs equal its full causal forward (RoPE,
  2 kv heads). The cache, sized on 3 tokens, holds only the state and the index."""
  layer = MultiHeadAttention(num_heads=N, num_kv_heads=KV, causal=True, rope_base=10000.0,
                             mechanism=mechanism, mechanism_kwargs=CASES[mechanism],
                             bias_init=nn.initializers.normal(0.1))
  x = jax.random.normal(jax.random.PRNGKey(0), (B, T, D), jnp.float32)

  def init_apply(x):
    variables = layer.init(jax.random.PRNGKey(1), x)
    return variables, layer.apply(variables, x)

  params, full = jax.jit(init_apply)(x)
  cache = jax.eval_shape(lambda x: layer.init(jax.random.PRNGKey(1), x[:, :3], decode=True),
                         x)["cache"]
  assert set(cache) == {"state", "cache_index"}
  floats = sum(leaf.size for leaf in jax.tree.leaves(cache["state"])) // B
  mech = aj.get_mechanism(mechanism)
  assert floats == mech.decode_state_floats(T, N, KV, D // N, D // N, CASES[mechanism])
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache)
  step = jax.jit(lambda cache, xs: layer.apply({**params, "cache": cache}, xs, decode=True,
                                               mutable=["cache"]))
  outs = []
  for a, b in [(0, 4)] + [(t, t + 1) for t in range(4, T)]:
    out, mutated = step(cache, x[:, a:b])
    outs.append(out)
    cache = mutated["cache"]
  assert int(cache["cache_index"]) == T
  chex.assert_trees_all_close(jnp.concatenate(outs, axis=1), full, **TOL)
