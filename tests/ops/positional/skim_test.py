"""Skim-Attention (#67): the functions against float64 rewrites of the authors' code, and the paper's
defining property on the Skimformer encoder: attention from layout alone (the weights ignore the
text and are shared by every layer), so the model sees where words are on the page, not the order
they were read in; SkimmingMask keeps exactly the top-k keys of each row and, as a mask_mod, gives
flex_attention the same result as a dense masked softmax.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax.core import masks
from attnjax.nn import SkimformerEncoder, SkimformerLayer
from attnjax.ops.positional import skim
from tests import inputs
from tests import numpy_math
from tests import tolerances

B, T, N, K, H, D, M = 2, 13, 4, 2, 8, 16, 64
F32 = tolerances.output(jnp.float32)


def _boxes(seed=0, T=T):
  rng = np.random.default_rng(seed)
  corner = rng.integers(0, M // 2, size=(B, T, 2))
  size = rng.integers(0, M // 2, size=(B, T, 2))
  return jnp.asarray(np.concatenate([corner, corner + size], -1), jnp.int32)


def test_layout_embedding_sums_the_six_table_rows():
  tables = [np.random.default_rng(i).standard_normal((M, 5)).astype(np.float32) for i in range(4)]
  bbox = np.asarray(_boxes())
  x0, y0, x1, y1 = (bbox[..., i] for i in range(4))
  xt, yt, ht, wt = (t.astype(np.float64) for t in tables)
  want = xt[x0] + yt[y0] + xt[x1] + yt[y1] + ht[y1 - y0] + wt[x1 - x0]
  got = skim.layout_embedding(jnp.asarray(bbox), *tables)
  np.testing.assert_allclose(got, want, **F32)


@pytest.mark.parametrize("bad", [[[[0, 0, M, 1]]], [[[5, 0, 4, 1]]], [[[-1, 0, 3, 3]]]])
def test_layout_embedding_rejects_boxes_outside_the_tables(bad):
  tables = [jnp.zeros((M, 3))] * 4
  with pytest.raises(ValueError, match=r"bbox.*\[0, 64\)"):
    skim.layout_embedding(jnp.asarray(bad, jnp.int32), *tables)


def test_weights_are_the_softmax_of_layout_scores_with_padding():
  q, k, _ = inputs.qkv(B=B, T=T, S=T, N=N, K=K, H=H, h=H)
  lengths = jnp.asarray([T, 7])
  got = np.asarray(skim.skim_attention_weights(q, k, kv_lengths=lengths))
  q64, k64 = np.asarray(q, np.float64), np.repeat(np.asarray(k, np.float64), N // K, axis=2)
  s = np.einsum("btnh,bsnh->bnts", q64, k64) / np.sqrt(H)
  visible = (np.arange(T) < np.asarray(lengths)[:, None])[:, None, None, :]
  np.testing.assert_allclose(got, numpy_math.softmax(s, where=visible), **F32)
  assert np.all(got[1, :, :, 7:] == 0)
  # A row with no visible key is all zeros, not NaN.
  empty = skim.skim_attention_weights(q, k, kv_lengths=jnp.asarray([0, 3]))
  assert np.all(np.asarray(empty)[0] == 0) and np.isfinite(np.asarray(empty)).all()


def test_apply_weights_is_a_weighted_sum_of_values_per_kv_head():
  w = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(1), (B, N, T, T)), -1)
  v = jax.random.normal(jax.random.PRNGKey(2), (B, T, K, 6))
  want = np.einsum("bnts,bsnh->btnh", np.asarray(w, np.float64),
                   np.repeat(np.asarray(v, np.float64), N // K, axis=2))
  np.testing.assert_allclose(skim.apply_skim_weights(w, v), want, **F32)
  with pytest.raises(ValueError, match=r"`v` must have shape \[B, S, K, h\]"):
    skim.apply_skim_weights(w, v[:, :5])


def test_skimming_mask_keeps_the_top_k_visible_keys_of_each_row():
  w = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(3), (B, N, T, T)), -1)
  visible = jnp.broadcast_to((jnp.arange(T) < jnp.asarray([T, 3])[:, None])[:, None, None, :],
                             w.shape)
  mask = np.asarray(skim.skimming_mask(w, 5, visible=visible))
  counts = mask.sum(-1)
  assert np.all(counts[0] == 5) and np.all(counts[1] == 3)  # row 1 has only 3 visible keys
  assert not np.any(mask & ~np.asarray(visible))
  # The kept keys are the largest weights: every kept weight >= every dropped visible weight.
  wn = np.asarray(w)[0]
  kept_min = np.where(mask[0], wn, np.inf).min(-1)
  dropped_max = np.where(~mask[0], wn, -np.inf).max(-1)
  assert np.all(kept_min >= dropped_max)


def test_skimming_mask_as_a_mask_mod_restricts_another_models_attention():
  q, k, v = inputs.qkv(B=B, T=T, S=T, N=N, K=N, H=H, h=6, seed=4)
  lq, lk, _ = inputs.qkv(B=B, T=T, S=T, N=N, K=N, H=H, h=H, seed=5)
  mask = skim.skimming_mask(skim.skim_attention_weights(lq, lk), 4)
  got = aj.flex_attention(q, k, v, mask_mod=masks.from_array(mask))
  s = np.einsum("btnh,bsnh->bnts", np.asarray(q, np.float64), np.asarray(k, np.float64)) / np.sqrt(H)
  w = numpy_math.softmax(s, where=np.asarray(mask))
  want = np.einsum("bnts,bsnh->btnh", w, np.asarray(v, np.float64))
  np.testing.assert_allclose(got, want, **F32)


def _encoder(**kw):
  model = SkimformerEncoder(num_layers=2, num_heads=N, mlp_dim=32, num_coordinates=M, **kw)
  x = jax.random.normal(jax.random.PRNGKey(6), (B, T, D))
  bbox = _boxes()
  variables = model.init(jax.random.PRNGKey(7), x, bbox)
  return model, variables, x, bbox


@pytest.mark.parametrize("layout_layers", [0, 1])
def test_encoder_attention_depends_on_layout_alone_and_not_on_reading_order(layout_layers):
  model, variables, x, bbox = _encoder(layout_layers=layout_layers)
  apply = jax.jit(lambda x, bbox: model.apply(variables, x, bbox))
  hidden, weights = apply(x, bbox)
  # Other text on the same layout: the same weights; another layout: different weights.
  _, other_text = apply(x + 1.0, bbox)
  np.testing.assert_array_equal(other_text, weights)
  _, other_layout = apply(x, _boxes(seed=1))
  assert np.max(np.abs(np.asarray(other_layout) - np.asarray(weights))) > 1e-3
  # Reading order: permuting the tokens (text and boxes together) permutes the outputs.
  perm = np.random.default_rng(0).permutation(T)
  hidden_p, weights_p = apply(x[:, perm], bbox[:, perm])
  np.testing.assert_allclose(hidden_p, np.asarray(hidden)[:, perm], **F32)
  np.testing.assert_allclose(weights_p, np.asarray(weights)[:, :, perm][..., perm], **F32)


def test_every_layer_reuses_the_one_map():
  """The encoder equals its layers applied by hand to the single map it returns."""
  model, variables, x, bbox = _encoder()
  hidden, weights = model.apply(variables, x, bbox)
  h = x
  for i in range(2):
    layer = SkimformerLayer(mlp_dim=32)
    h = layer.apply({"params": variables["params"][f"layer_{i}"]}, h, weights)
  np.testing.assert_allclose(hidden, h, **F32)
  np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, **F32)


def test_encoder_padding_and_batch_independence():
  model, variables, x, bbox = _encoder(layout_layers=1)
  lengths = jnp.asarray([T, 8])
  hidden, weights = model.apply(variables, x, bbox, kv_lengths=lengths)
  assert np.all(np.asarray(weights)[1, :, :, 8:] == 0)
  # Row 1's first 8 tokens alone give the same result as inside the padded batch.
  alone, _ = model.apply(variables, x[1:, :8], bbox[1:, :8])
  np.testing.assert_allclose(np.asarray(hidden)[1, :8], np.asarray(alone)[0], **F32)


def test_gradients_reach_the_layout_tables_and_the_skim_projections():
  model, variables, x, bbox = _encoder()

  def loss(params):
    out, _ = model.apply({"params": params}, x, bbox, kv_lengths=jnp.asarray([T, 8]))
    return jnp.sum(out ** 2)

  grads = jax.jit(jax.grad(loss))(variables["params"])
  for name in ("x_table", "h_table"):
    g = grads["layout_embedding"][name]
    assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0
  assert np.abs(np.asarray(grads["skim_attention"]["query"]["kernel"])).max() > 0


def test_encoder_errors_name_the_argument():
  model, variables, x, bbox = _encoder()
  with pytest.raises(ValueError, match=r"`bbox` must have shape \[B, T, 4\]"):
    model.apply(variables, x, bbox[:, :5])
  with pytest.raises(ValueError, match="SkimformerLayer: `x` must have shape"):
    SkimformerLayer().init(jax.random.PRNGKey(0), x, jnp.ones((B, N, 5, 5)))
