"""The Flax layer: parity with flax.linen.MultiHeadDotProductAttention, GQA, RoPE, decode through
the cache, learned mechanism arrays, and every registered mechanism running in the layer."""

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax.nn import MultiHeadAttention
from attnjax.registry import Mechanism, ParamSpec
from tests import inputs
from tests import tolerances

B, T, S, D, DKV, N = 2, 11, 7, 16, 12, 4
TOL = tolerances.output(jnp.float32)


def _apply(layer, variables, *args, **kwargs):
  """`layer.apply` under jit (eager dispatch of the chunked operator is slow on CPU)."""
  return jax.jit(lambda v, a: layer.apply(v, *a, **kwargs))(variables, args)


def _init_apply(layer, x, kv=None, **given):
  """(variables, output) of a fresh layer on `x` (cross-attending to `kv` when given; with the
  per-token arrays `given`), in one compilation of one pass (`init_with_output`: the output of the
  initialized variables, without a second trace of the layer to apply them)."""

  def run(x, kv, given):
    out, variables = layer.init_with_output(jax.random.PRNGKey(0), x, kv, **given)
    return variables, out

  return jax.jit(run)(x, kv, given)


def _x(shape, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def _flax_layer(**kw):
  return nn.MultiHeadDotProductAttention(num_heads=N, bias_init=nn.initializers.normal(0.1), **kw)


def _our_layer(**kw):
  return MultiHeadAttention(num_heads=N, bias_init=nn.initializers.normal(0.1), **kw)


# --------------------------------------------------------------------------------------------------
# Parity with flax.linen.MultiHeadDotProductAttention (its parameters load directly).


@pytest.mark.parametrize("case", ["self", "cross", "causal", "padding", "segments", "qk_norm"])
def test_matches_flax_with_its_parameters(case):
  x, m = _x((B, T, D)), _x((B, S, DKV), seed=1)
  lengths = jnp.array([T, 4])
  segments = jnp.array([[0] * 5 + [1] * 6, [0] * 11])
  kw = dict(qkv_features=24, out_features=10, normalize_qk=case == "qk_norm")
  flax_layer = _flax_layer(**kw)
  args, mask, ours = (x,), None, {}
  if case == "cross":
    args = (x, m)
  elif case == "causal":
    mask = nn.make_causal_mask(x[..., 0])
  elif case == "padding":
    mask = nn.make_attention_mask(jnp.ones((B, T)), jnp.arange(T) < lengths[:, None])
    ours = dict(kv_lengths=lengths)
  elif case == "segments":
    mask = nn.make_attention_mask(segments, segments, jnp.equal)
    ours = dict(segment_ids=segments)
  params = flax_layer.init(jax.random.PRNGKey(2), *args)
  want = flax_layer.apply(params, *args, mask=mask)

  layer = _our_layer(causal=case == "causal", **kw)
  shapes = jax.eval_shape(lambda a: layer.init(jax.random.PRNGKey(3), *a, **ours), args)
  chex.assert_trees_all_equal_shapes(shapes, params)
  got = _apply(layer, params, *args, **ours)
  chex.assert_shape(got, (B, T, 10))
  chex.assert_trees_all_close(got, want, **TOL)


# --------------------------------------------------------------------------------------------------
# GQA


def _repeat_kv_heads(params, groups):
  """The K = N layer equal to a GQA layer: query head n reads K/V head n // groups."""
  p = jax.tree.map(lambda a: a, params)
  for name in ("key", "value"):
    p["params"][name]["kernel"] = jnp.repeat(p["params"][name]["kernel"], groups, axis=1)
    p["params"][name]["bias"] = jnp.repeat(p["params"][name]["bias"], groups, axis=0)
  return p


@pytest.mark.parametrize("causal", [False, True])
def test_gqa_equals_repeated_kv_heads(causal):
  x = _x((B, T, D))
  gqa = _our_layer(num_kv_heads=2, causal=causal, rope_base=10000.0)
  params, out = _init_apply(gqa, x)
  chex.assert_shape(params["params"]["key"]["kernel"], (D, 2, D // N))
  full = _our_layer(causal=causal, rope_base=10000.0)
  chex.assert_trees_all_close(out, _apply(full, _repeat_kv_heads(params, 2), x), **TOL)
  # A mechanism without GQA support gets the K/V heads repeated by the layer.
  no_gqa = dataclasses.replace(aj.get_mechanism("softmax"), gqa=False)
  chex.assert_trees_all_close(
      _apply(_our_layer(num_kv_heads=2, causal=causal, rope_base=10000.0, mechanism=no_gqa), params,
             x),
      out, **TOL)


# --------------------------------------------------------------------------------------------------
# Decode through the cache equals the full causal forward.


def _decode_all(layer, params, x, prefill, **given):
  """Prefill `prefill` tokens, then feed the rest one at a time (with their slices of the per-token
  arrays `given`); returns all outputs [B, T, F]."""
  # The cache starts as zeros with index 0: its shapes are all `init` needs to compute.
  shapes = jax.eval_shape(lambda x, g: layer.init(jax.random.PRNGKey(9), x, decode=True, **g), x,
                          given)["cache"]
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  step = jax.jit(lambda cache, xs, g: layer.apply({**params, "cache": cache}, xs, decode=True,
                                                  mutable=["cache"], **g))
  part = lambda a, b: {key: value[:, a:b] for key, value in given.items()}
  out, mutated = step(cache, x[:, :prefill], part(0, prefill))
  outs, cache = [out], mutated["cache"]
  for t in range(prefill, x.shape[1]):
    out, mutated = step(cache, x[:, t:t + 1], part(t, t + 1))
    outs.append(out)
    cache = mutated["cache"]
  assert int(cache["cache_index"]) == x.shape[1]
  return jnp.concatenate(outs, axis=1)


@pytest.mark.parametrize("mechanism,kv_heads", [("softmax", N), ("alibi", N), ("softmax", 2)])
def test_decode_equals_full_causal_forward(mechanism, kv_heads):
  x = _x((B, T, D))
  layer = _our_layer(mechanism=mechanism, num_kv_heads=kv_heads, causal=True, rope_base=10000.0,
                     rope_fraction=0.5)
  params, full = _init_apply(layer, x)
  cache = jax.eval_shape(lambda x: layer.init(jax.random.PRNGKey(0), x, decode=True), x)["cache"]
  chex.assert_shape(cache["cached_key"], (B, T, kv_heads, D // N))
  chex.assert_trees_all_close(_decode_all(layer, params, x, prefill=4), full, **TOL)


@pytest.mark.parametrize("mechanism", ["lightning_attention_2", "favor_plus_attention"])
def test_recurrent_mechanism_decodes_with_a_fixed_size_state(mechanism):
  """A recurrent mechanism's cache is its state (the registry's state_size numbers per sequence),
  not a KV cache, so decoding is not bounded by the length the cache was sized on."""
  layer = _our_layer(mechanism=mechanism, num_kv_heads=2, causal=True, rope_base=10000.0)
  x = _x((B, 11, D))
  params, full = _init_apply(layer, x)
  cache = jax.eval_shape(lambda x: layer.init(jax.random.PRNGKey(0), x[:, :3], decode=True),
                         x)["cache"]
  assert set(cache) == {"state", "cache_index"}
  mech = aj.get_mechanism(mechanism)
  floats = sum(leaf.size for leaf in jax.tree.leaves(cache["state"])) // B
  assert floats == mech.decode_state_floats(11, N, 2, D // N, D // N)
  # The cache was sized on 3 tokens; 11 decode through it.
  step = jax.jit(lambda cache, xs: layer.apply({**params, "cache": cache}, xs, decode=True,
                                               mutable=["cache"]))
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache)
  outs = []
  for t in range(x.shape[1]):
    out, mutated = step(cache, x[:, t:t + 1])
    outs.append(out)
    cache = mutated["cache"]
  chex.assert_trees_all_close(jnp.concatenate(outs, axis=1), full, **TOL)


def test_decode_errors():
  x = _x((B, T, D))
  no_decode = dataclasses.replace(aj.get_mechanism("softmax"), name="no_decode", decode=False)
  layer = _our_layer(mechanism=no_decode, causal=True)
  with pytest.raises(ValueError, match="does not support decoding"):
    layer.init(jax.random.PRNGKey(0), x, decode=True)
  with pytest.raises(ValueError, match="self-attention"):
    _our_layer(causal=False).init(jax.random.PRNGKey(0), x, _x((B, S, D)), decode=True)
  layer = _our_layer(causal=True)
  variables = jax.eval_shape(lambda x: layer.init(jax.random.PRNGKey(0), x, decode=True), x)
  with pytest.raises(ValueError, match="do not fit"):
    jax.eval_shape(lambda v, y: layer.apply(v, y, decode=True, mutable=["cache"]), variables,
                   jnp.concatenate([x, x], axis=1))


# --------------------------------------------------------------------------------------------------
# RoPE positions, patterns and learned mechanism arrays.


def test_packed_rope_equals_separate_documents():
  """Segment-local RoPE positions: a packed row equals its documents run alone."""
  x = _x((1, T, D))
  layer = _our_layer(causal=True, rope_base=10000.0)
  params, _ = _init_apply(layer, x[:, :5])
  packed = _apply(layer, params, x, segment_ids=jnp.array([[0] * 5 + [1] * 6]))
  chex.assert_trees_all_close(packed, jnp.concatenate(
      [_apply(layer, params, x[:, :5]), _apply(layer, params, x[:, 5:])], axis=1), **TOL)


def test_unsupported_pattern_and_bad_heads_raise():
  x = _x((B, T, D))
  with pytest.raises(ValueError, match="does not support self attention"):
    _our_layer(mechanism="prefix_lm", mechanism_kwargs=dict(prefix_length=3)).init(
        jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="must divide"):
    _our_layer(num_kv_heads=3).init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="unknown attention mechanism"):
    _our_layer(mechanism="no_such_mechanism").init(jax.random.PRNGKey(0), x)


def _tempered(q, k, v, *, log_temperature, **kw):
  """Softmax attention with a learned per-head temperature on the queries (test mechanism)."""
  q = q * jnp.exp(log_temperature)[None, None, :, None].astype(q.dtype)
  return aj.dot_product_attention(q, k, v, **kw)


def test_mechanism_params_are_created_and_trained():
  mech = Mechanism(name="tempered", fn=_tempered, family="test", seeds=(147,), paper="test",
                   arxiv="0000.00000", params=(ParamSpec("log_temperature", lambda n, kv, h: (n,),
                                                         nn.initializers.zeros),))
  x = _x((B, T, D))
  layer = _our_layer(mechanism=mech, causal=True, head_dim=8)
  params, out = _init_apply(layer, x)
  chex.assert_shape(params["params"]["log_temperature"], (N,))
  chex.assert_shape(params["params"]["query"]["kernel"], (D, N, 8))
  # Zero log-temperature is plain softmax attention with the same projections.
  chex.assert_trees_all_close(
      out,
      _apply(_our_layer(causal=True, head_dim=8),
             {"params": {k: v for k, v in params["params"].items() if k != "log_temperature"}}, x),
      **TOL)
  grad = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply(p, x) ** 2)))(params)
  assert float(jnp.abs(grad["params"]["log_temperature"]).sum()) > 0


# --------------------------------------------------------------------------------------------------
# Every registered mechanism runs in the layer (and decodes, when it says it can).


def _layer_decode_paths() -> set[str]:
  """Mechanisms whose decoding through the layer takes a path of its own: a carried recurrent state,
  cached per-token arrays, a cache without values (or projections skipped), a sampling key; plus the
  first of each family. The others decode through the same KV-cache step as these (their operator's
  decode is checked by the conformance suite), so the layer's three compiled programs of a decode
  run are spent once per path, not once per mechanism."""
  chosen, families = set(), set()
  for m in aj.list_mechanisms():
    own_path = (m.recurrent or m.token_inputs or set(m.reads) != {"q", "k", "v"}
                or m.rng is not None)
    if own_path or m.family not in families:
      chosen.add(m.name)
    families.add(m.family)
  return chosen


LAYER_DECODE = _layer_decode_paths()


@pytest.mark.parametrize("name", [m.name for m in aj.list_mechanisms()])
def test_every_registered_mechanism_runs_in_the_layer(name):
  mech = aj.get_mechanism(name)
  decodes = mech.decode and "causal_self" in mech.patterns
  # A cross-attention-only mechanism (learned queries over another sequence) runs on a second input.
  cross_only = not {"self", "causal_self"} & mech.patterns
  causal = (decodes or "self" not in mech.patterns) and not cross_only
  assert cross_only or ("causal_self" if causal else "self") in mech.patterns
  # Width 32 gives the conformance head dim (8). The example's arrays are sized for the conformance
  # suite (value width 6); the layer creates its own learned arrays, so only settings are kept.
  width = 32
  x = _x((B, T, width))
  settings = {key: value for key, value in mech.example_kwargs.items()
              if not isinstance(value, (np.ndarray, jax.Array))}
  layer = _our_layer(mechanism=name, mechanism_kwargs=settings, num_kv_heads=2, causal=causal,
                     rope_base=10000.0)
  # Per-token arrays the caller supplies (token types, masks), derived from x; projected ones are
  # the layer's own ('<name>_proj').
  kv = _x((B, T + 3, width), seed=1) if cross_only else None
  given = inputs.token_inputs(mech, x, x if kv is None else kv, N=N, K=2, H=8, kinds=("given",))
  params, out = _init_apply(layer, x, kv, **given)
  chex.assert_shape(out, (B, T, width))
  chex.assert_tree_all_finite(out)
  # Projections exist only for the inputs the mechanism reads, and the arrays its paper keeps
  # fixed are buffers, out of the optimizer's reach.
  for letter, projection in (("q", "query"), ("k", "key"), ("v", "value")):
    assert (projection in params["params"]) == (letter in mech.reads), (letter, mech.reads)
  for spec in mech.token_inputs:
    assert (f"{spec.name}_proj" in params["params"]) == (spec.kind == "projected"), spec.name
  for spec in mech.params:
    collection = "params" if spec.trainable else "buffers"
    assert spec.name in params.get(collection, {}), (spec.name, collection)
    assert spec.name not in params.get("buffers" if spec.trainable else "params", {}), spec.name
  if decodes and name in LAYER_DECODE:
    # The prefill covers prefix_lm's bidirectional prefix (example prefix_length=5).
    np.testing.assert_allclose(_decode_all(layer, params, x, prefill=6, **given), out, **TOL)


def test_decoding_past_the_cache_raises_eagerly_and_under_jit():
  layer = _our_layer(causal=True)
  x = _x((B, 8, D))
  variables = layer.init(jax.random.PRNGKey(0), x, decode=True)
  params, cache = {"params": variables["params"]}, variables["cache"]
  step = jax.jit(lambda cache, xs: layer.apply({**params, "cache": cache}, xs, decode=True,
                                               mutable=["cache"]))
  _, mutated = step(cache, x)                                       # fills all 8 slots
  with pytest.raises(Exception, match="overruns the KV cache of length 8"):
    jax.block_until_ready(step(mutated["cache"], x[:, :1]))        # traced index: runtime error
  with pytest.raises(ValueError, match="overruns the KV cache of length 8"):
    layer.apply({**params, "cache": mutated["cache"]}, x[:, :1], decode=True, mutable=["cache"])


def test_sampling_mechanism_gets_a_key_from_the_sample_stream():
  # YOSO samples its hashes when the layer is given a 'sample' key; without one it runs the exact
  # expectation (deterministic), as dropout does without a 'dropout' key.
  layer = _our_layer(mechanism="yoso_attention", head_dim=8)
  x = _x((B, T, D))
  variables = layer.init(jax.random.PRNGKey(0), x)
  exact = layer.apply(variables, x)
  sampled = [layer.apply(variables, x, rngs={"sample": jax.random.PRNGKey(i)}) for i in (1, 2)]
  assert not np.allclose(sampled[0], exact) and not np.allclose(sampled[0], sampled[1])
  chex.assert_trees_all_close(layer.apply(variables, x, rngs={"sample": jax.random.PRNGKey(1)}),
                              sampled[0])
