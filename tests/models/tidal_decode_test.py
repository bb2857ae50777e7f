"""TidalDecode in the decoder (`model.tidal_decode`, arXiv:2410.05076, catalog row 119): on a
single-token decode step the sparse layers read only the cache positions the last selection layer
chose (changing any other position of their cache leaves the logits bitwise equal, changing a chosen
one does not), the selection layers still attend to everything, a top-k covering the cache
generates exactly as full attention, prefill is untouched, and bad settings stop at the config."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from attnjax import models
from attnjax.data.base import TaskSpec

B, P, NEW, V = 2, 7, 4, 40
SPEC = TaskSpec(name="toy_lm", kind="lm", input_shape=(P + NEW,), input_dtype="int32",
                vocab_size=V, num_classes=V, seq_len=P + NEW)
# Roles: full, select, select (the re-selection), sparse.
BASE = dict(arch="decoder_lm", width=32, depth=4, num_heads=4, num_kv_heads=2, mlp_dim=64,
            rope_base=10000.0, tie_embeddings=False)
TIDAL = {"top_k": 2, "selection_layer": 1, "reselection_layer": 2}


@functools.lru_cache(maxsize=None)
def _model(top_k=None):
  tidal = None if top_k is None else {**TIDAL, "top_k": top_k}
  return models.build_model(ml_collections.ConfigDict({**BASE, "tidal_decode": tidal}), SPEC)


@functools.lru_cache(maxsize=None)
def _params():
  return jax.jit(_model().init)(jax.random.PRNGKey(0), models.dummy_inputs(SPEC, B))["params"]


def _prompt():
  return jax.random.randint(jax.random.PRNGKey(5), (B, P), 0, V, jnp.int32)


@functools.lru_cache(maxsize=None)
def _prefilled(top_k):
  """The decode cache after the prompt (compiled: eager dispatch would compile each primitive)."""
  model = _model(top_k)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((B, P + NEW), jnp.int32),
                                             decode=True))["cache"]
  cache = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
  _, mutated = jax.jit(lambda params, cache, prompt: model.apply(
      {"params": params, "cache": cache}, prompt, decode=True, mutable=["cache"]))(
          _params(), cache, _prompt())
  return mutated["cache"]


def _step(top_k):
  """A jitted single-token step returning logits, the sown selection and the new cache."""
  model = _model(top_k)

  @jax.jit
  def step(cache, token):
    logits, state = model.apply({"params": _params(), "cache": cache}, token, decode=True,
                                mutable=["cache", "intermediates"])
    selection = state.get("intermediates", {}).get("decoder", {}).get("tidal_selection")
    return logits, selection, state["cache"]

  return step


def test_sparse_layers_read_only_the_positions_the_selection_layer_chose():
  cache, step = _prefilled(TIDAL["top_k"]), _step(TIDAL["top_k"])
  token = jnp.full((B, 1), 3, jnp.int32)
  logits, selection, _ = step(cache, token)
  assert selection is not None, "the step sowed no selection"
  indices, valid = (np.asarray(a) for a in selection[0])
  assert indices.shape == (B, 4, 1, TIDAL["top_k"]) and valid.all()
  chosen = np.zeros((B, P + NEW), bool)
  for b in range(B):
    chosen[b, indices[b].ravel()] = True
  # Positions before the current token (P) that no head chose; the step writes position P itself.
  unchosen = ~chosen & (np.arange(P + NEW) < P)
  assert unchosen.any() and (chosen[:, :P]).any()

  def perturbed(layer, where):
    """The cache with noise on layer `layer`'s keys and values at the positions `where` [B, S]."""
    attn = cache["decoder"][f"layer_{layer}"]["attention"]
    noise = jax.random.normal(jax.random.PRNGKey(layer), attn["cached_value"].shape)
    mask = jnp.asarray(where)[:, :, None, None]
    attn = {**attn, **{name: jnp.where(mask, attn[name] + noise, attn[name])
                       for name in ("cached_key", "cached_value")}}
    layers = {**cache["decoder"], f"layer_{layer}": {**cache["decoder"][f"layer_{layer}"],
                                                     "attention": attn}}
    return {**cache, "decoder": layers}

  same = step(perturbed(3, unchosen), token)[0]
  np.testing.assert_array_equal(np.asarray(same), np.asarray(logits))
  moved = step(perturbed(3, chosen & (np.arange(P + NEW) < P)), token)[0]
  assert np.abs(np.asarray(moved) - np.asarray(logits)).max() > 1e-3
  # A selection layer attends to every position: the unchosen ones move its output.
  moved = step(perturbed(2, unchosen), token)[0]
  assert np.abs(np.asarray(moved) - np.asarray(logits)).max() > 1e-3


def test_a_top_k_covering_the_cache_decodes_as_full_attention():
  variables = {"params": _params()}
  tokens = models.generate(_model(P + NEW), variables, _prompt(), NEW, rng=jax.random.PRNGKey(1))
  expected = models.generate(_model(), variables, _prompt(), NEW, rng=jax.random.PRNGKey(1))
  np.testing.assert_array_equal(np.asarray(tokens), np.asarray(expected))


def test_prefill_is_full_attention():
  # The prefilled caches (keys and values of every layer) equal those of the full-attention model.
  for a, b in zip(jax.tree.leaves(_prefilled(TIDAL["top_k"])), jax.tree.leaves(_prefilled(None)),
                  strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("change, message", [
    (dict(tidal_decode={"top_k": 0}), "model.tidal_decode: 'top_k' must be an int >= 1"),
    (dict(tidal_decode={"top_k": 2, "selection_layer": 4}),
     r"model.tidal_decode: tidal_layer_roles: `selection_layer` must be in \[0, 4\)"),
    (dict(tidal_decode={"top_k": 2, "budget": 3}), r"model.tidal_decode: unknown keys \['budget'\]"),
    (dict(tidal_decode={"top_k": 2}, layer_mechanisms="every 4: sliding_window",
          layer_mechanism_kwargs={"sliding_window": {"window": 4}}),
     "model.tidal_decode: the layers from selection_layer 2 on must be 'softmax'"),
    (dict(arch="encoder_classifier", tidal_decode={"top_k": 2}),
     "model.tidal_decode is a decoder_lm option"),
])
def test_bad_settings_stop_at_the_config(change, message):
  with pytest.raises(ValueError, match=message):
    models.check_config(ml_collections.ConfigDict({**BASE, **change}))
