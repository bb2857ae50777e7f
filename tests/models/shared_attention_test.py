"""Shared Attention (Liao et al., "Beyond KV Caching: Shared Attention for Efficient LLMs",
arXiv:2407.12866): the layers of a span after its anchor reuse the anchor's softmax weights and compute
only their values, so they hold no query / key projections and no key cache; decoding through the
caches gives the full forward's tokens."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from attnjax import models
from attnjax.data.base import TaskSpec
from attnjax.nn import MultiHeadAttention
from tests import tolerances

B, T, D, N, K = 2, 7, 16, 4, 2
V = 23
SPEC = TaskSpec(name="toy_lm", kind="lm", input_shape=(12,), input_dtype="int32", vocab_size=V,
                num_classes=V, seq_len=12)
BASE = dict(arch="decoder_lm", width=32, depth=4, num_heads=4, num_kv_heads=2, mlp_dim=64,
            mechanism="softmax", rope_base=10000.0, tie_embeddings=False,
            shared_attention=[[1, 4]])


def _np_softmax_weights(x, p):
  """float64 causal softmax weights [B, N, T, T] of the anchor (GQA: head n reads kv head n // G)."""
  q = np.einsum("btd,dnh->btnh", x, p["query"]["kernel"]) + p["query"]["bias"]
  k = np.einsum("btd,dkh->btkh", x, p["key"]["kernel"]) + p["key"]["bias"]
  k = np.repeat(k, N // K, axis=2)
  s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
  w = np.exp(s - s.max(-1, keepdims=True))
  return w / w.sum(-1, keepdims=True)


def test_a_shared_layer_applies_the_anchors_weights_to_its_own_values():
  rng = np.random.default_rng(0)
  x1, x2 = rng.standard_normal((2, B, T, D)).astype(np.float32)
  layer = MultiHeadAttention(num_heads=N, num_kv_heads=K, causal=True)
  anchor = layer.init(jax.random.PRNGKey(0), x1)
  follower = layer.init(jax.random.PRNGKey(1), x2, shared_weights=jnp.zeros((B, N, T, T)))
  assert set(follower["params"]) == {"value", "out"}          # no query / key projections
  y1, weights = layer.apply(anchor, x1, return_weights=True)
  y2 = layer.apply(follower, x2, shared_weights=weights)
  p1 = jax.tree.map(lambda a: np.asarray(a, np.float64), anchor["params"])
  p2 = jax.tree.map(lambda a: np.asarray(a, np.float64), follower["params"])
  w = _np_softmax_weights(x1.astype(np.float64), p1)
  np.testing.assert_allclose(np.asarray(weights), w, **tolerances.OUTPUT[jnp.float32])
  np.testing.assert_allclose(np.asarray(y1), np.asarray(layer.apply(anchor, x1)),
                             **tolerances.OUTPUT[jnp.float32])
  v = np.repeat(np.einsum("btd,dkh->btkh", x2, p2["value"]["kernel"]) + p2["value"]["bias"],
                N // K, axis=2)
  o = np.einsum("bnts,bsnh->btnh", w, v)
  want = np.einsum("btnh,nhf->btf", o, p2["out"]["kernel"]) + p2["out"]["bias"]
  np.testing.assert_allclose(np.asarray(y2), want, **tolerances.OUTPUT[jnp.float32])


@functools.lru_cache(maxsize=None)
def _model():
  model = models.build_model(ml_collections.ConfigDict(BASE), SPEC)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), models.dummy_inputs(SPEC, 2))
  return model, variables


def test_the_span_keeps_values_only_and_decodes_as_the_full_forward():
  model, variables = _model()
  for i in (2, 3):
    assert set(variables["params"]["decoder"][f"layer_{i}"]["attention"]) == {"value", "out"}
  cache = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((2, 12), jnp.int32),
                                            decode=True))["cache"]["decoder"]
  assert "cached_key" in cache["layer_1"]["attention"]
  assert "cached_key" not in cache["layer_2"]["attention"]
  prompt = np.array([[3, 1, 4], [2, 7, 1]], np.int32)
  cached = models.generate(model, variables, prompt, 6, rng=jax.random.PRNGKey(0), use_cache=True)
  recomputed = models.generate(model, variables, prompt, 6, rng=jax.random.PRNGKey(0),
                               use_cache=False)
  np.testing.assert_array_equal(np.asarray(cached), np.asarray(recomputed))
  # The span is not ordinary attention: its layers change the logits when the anchor's weights do.
  other = dict(BASE, shared_attention=None)
  plain = models.build_model(ml_collections.ConfigDict(other), SPEC)
  assert set(jax.eval_shape(plain.init, jax.random.PRNGKey(0), models.dummy_inputs(SPEC, 2))
             ["params"]["decoder"]["layer_2"]["attention"]) == {"query", "key", "value", "out"}


@pytest.mark.parametrize("spans,match", [([[1, 2]], "start < end - 1"),
                                         ([[0, 2], [1, 3]], "overlap"),
                                         ([[0, 9]], "depth"),
                                         ("every 2", "list of")])
def test_bad_spans_are_rejected(spans, match):
  with pytest.raises(ValueError, match=f"model.shared_attention.*{match}"):
    models.build_model(ml_collections.ConfigDict(dict(BASE, shared_attention=spans)), SPEC)
