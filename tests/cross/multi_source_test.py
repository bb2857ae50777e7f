"""Multi-source attention (arXiv:1704.06567): flat against a numpy loop over the concatenated sources,
hierarchical against a numpy loop of its two levels; with one source flat is additive attention;
the hierarchical weights over sources sum to one; padded positions and empty sources get no weight;
every weight of the flat form matters too (the conformance suite runs the hierarchical example)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax.cross import multi_source
from tests import tolerances

B, T, D, A = 2, 3, 6, 5
WIDTHS, LENGTHS = (4, 7), (5, 3)


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((B, T, D)).astype(np.float32)
  sources = [rng.standard_normal((B, s, d)).astype(np.float32)
             for s, d in zip(LENGTHS, WIDTHS, strict=True)]
  return x, sources


def _params(strategy, num_sources=2, seed=1):
  x, sources = _inputs()
  layer = multi_source.MultiSourceAttention(attention_dim=A, strategy=strategy)
  params = layer.init(jax.random.PRNGKey(seed), x, *sources[:num_sources])["params"]
  # Move every weight off its init (zero biases included) so each term shows in the comparison.
  rng = np.random.default_rng(seed)
  return layer, jax.tree.map(lambda a: np.asarray(a) + 0.3 * rng.standard_normal(np.shape(a)), params)


def _np_masked_softmax(e, keep):
  e = np.where(keep, e, -np.inf)
  if not keep.any():
    return np.zeros_like(e)
  w = np.exp(e - e[keep].max())
  return w / w.sum()


def _np_additive(s, keys, v):
  return np.array([v @ np.tanh(s + key) for key in keys])


def _np_flat(x, sources, p, masks):
  out = np.zeros((B, T, A))
  for b in range(B):
    for t in range(T):
      state = x[b, t] @ p["query_kernel"] + p["query_bias"]
      e, vals, keep = [], [], []
      for k, src in enumerate(sources):
        w = p[f"source_{k}"]
        e.append(_np_additive(state, src[b] @ w["logit_kernel"] + w["logit_bias"], p["energy"])
                 + w["energy_bias"])
        vals.append(src[b] @ w["context_kernel"] + w["context_bias"])
        keep.append(masks[k][b])
      alpha = _np_masked_softmax(np.concatenate(e), np.concatenate(keep))
      out[b, t] = alpha @ np.concatenate(vals)
  return out


def _np_hierarchical(x, sources, p, masks):
  out, betas = np.zeros((B, T, A)), np.zeros((B, T, len(sources)))
  for b in range(B):
    for t in range(T):
      state = x[b, t] @ p["query_kernel"] + p["query_bias"]
      e, ctxs, present = [], [], []
      for k, src in enumerate(sources):
        w = p[f"source_{k}"]
        inner_q = x[b, t] @ w["inner_query_kernel"] + w["inner_query_bias"]
        inner = _np_additive(inner_q, src[b] @ w["inner_key_kernel"] + w["inner_key_bias"],
                             w["inner_energy"])
        ctx = _np_masked_softmax(inner, masks[k][b]) @ src[b]
        e.append(p["energy"] @ np.tanh(state + ctx @ w["logit_kernel"] + w["logit_bias"])
                 + w["energy_bias"])
        ctxs.append(ctx @ w["context_kernel"] + w["context_bias"])
        present.append(masks[k][b].any())
      beta = _np_masked_softmax(np.array(e), np.array(present))
      betas[b, t] = beta
      out[b, t] = beta @ np.array(ctxs)
  return out, betas


def _call(strategy, params, x, sources, masks):
  return multi_source.multi_source_attention(
      jnp.asarray(x), *map(jnp.asarray, sources), strategy=strategy,
      masks=[jnp.asarray(m) for m in masks], **params)


def _masks():
  return [np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool), np.array([[1, 1, 1], [0, 0, 0]], bool)]


def test_flat_matches_numpy_with_padding():
  x, sources = _inputs(2)
  _, params = _params("flat")
  masks = _masks()
  got = _call("flat", params, x, sources, masks)
  np_params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  np.testing.assert_allclose(np.asarray(got), _np_flat(x, sources, np_params, masks),
                             **tolerances.output(jnp.float32))


def test_hierarchical_matches_numpy_and_its_source_weights_sum_to_one():
  x, sources = _inputs(3)
  _, params = _params("hierarchical")
  masks = _masks()     # example 1's second source is empty: it gets no weight
  got = _call("hierarchical", params, x, sources, masks)
  np_params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  want, betas = _np_hierarchical(x, sources, np_params, masks)
  np.testing.assert_allclose(np.asarray(got), want, **tolerances.output(jnp.float32))
  np.testing.assert_allclose(betas.sum(-1), 1.0, **tolerances.output(jnp.float32))
  assert np.all(betas[1, :, 1] == 0)


def test_flat_with_one_source_is_additive_attention_with_a_context_projection():
  x, sources = _inputs(4)
  _, params = _params("flat", num_sources=1)
  got = multi_source.multi_source_attention(jnp.asarray(x), jnp.asarray(sources[0]), **params)
  w = params["source_0"]
  f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
  q = (f32(x) @ f32(params["query_kernel"]) + f32(params["query_bias"]))[:, :, None]
  k = (f32(sources[0]) @ f32(w["logit_kernel"]) + f32(w["logit_bias"]))[:, :, None]
  values = (f32(sources[0]) @ f32(w["context_kernel"]) + f32(w["context_bias"]))[:, :, None]
  want = aj.attention("additive_attention", q, k, values, v_a=f32(params["energy"])[None],
                      cross=True)[:, :, 0]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), **tolerances.output(jnp.float32))


def test_every_flat_weight_matters():
  x, sources = _inputs(5)
  _, params = _params("flat")
  base = _call("flat", params, x, sources, [np.ones(s.shape[:2], bool) for s in sources])
  rng = np.random.default_rng(6)
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    moved = jax.tree_util.tree_map_with_path(
        lambda p, a, path=path, leaf=leaf: a + rng.standard_normal(np.shape(a)) if p == path else a,
        params)
    out = _call("flat", moved, x, sources, [np.ones(s.shape[:2], bool) for s in sources])
    assert tolerances.rel_rms(out, base) > tolerances.PARAM_CHANGED_REL_RMS, jax.tree_util.keystr(path)


def test_bad_inputs_are_clear_errors():
  x, sources = _inputs()
  _, params = _params("flat")
  with pytest.raises(ValueError, match="strategy"):
    multi_source.multi_source_attention(x, *sources, strategy="serial", **params)
  with pytest.raises(ValueError, match=r"source_1"):
    multi_source.multi_source_attention(x, sources[0], **params)
  with pytest.raises(ValueError, match=r"masks\[0\] must be \[B, S_k\]"):
    multi_source.multi_source_attention(x, *sources, masks=[np.ones((B, 2), bool), None], **params)
