"""MixEncoder (arXiv:2210.05261) against a float64 numpy rewrite of the first author's code (one
candidate at a time: the aggregation and context queries as extra query rows beside the text's
own, A's padding masked, the contexts' scores over A joined with those over their own candidate in
one softmax, the shared layer chunk with the gated update); and the paper's claims: each candidate
is scored on its own (changing or reordering the others changes nothing of it) and the query text is
projected once, however many candidates there are (compiled FLOPs per extra candidate below one
projection of the text); a fully padded text gives a finite, zero aggregation read."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from attnjax.cross import mixencoder as mix
from tests import tolerances

B, T, D, HEADS, NCAND, K = 2, 7, 8, 2, 3, 2


def _params(seed=0):
  layer = mix.MixEncoderLayer(num_heads=HEADS)
  variables = layer.init(jax.random.PRNGKey(seed), np.zeros((B, T, D), np.float32),
                         np.zeros((B, NCAND, K + 1, D), np.float32))
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(np.asarray(v) + 0.2 * rng.normal(size=v.shape), jnp.float32)
          for k, v in variables["params"].items()}


def _inputs(seed=1):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(B, T, D)).astype(np.float32)
  cand = rng.normal(size=(B, NCAND, K + 1, D)).astype(np.float32)
  mask = np.ones((B, T), bool)
  mask[1, 5:] = False                       # the second text is 5 tokens, padded to 7
  return x, cand, mask


def _ln(y, scale, bias):
  mu = y.mean(-1, keepdims=True)
  return (y - mu) / np.sqrt(((y - mu) ** 2).mean(-1, keepdims=True) + 1e-12) * scale + bias


def _np_mixencoder(x, cand, mask, p):
  p = {k: np.asarray(v, np.float64) for k, v in p.items()}
  x, cand = x.astype(np.float64), cand.astype(np.float64)
  lin = lambda y, name: y @ p[f"{name}_w"] + p[f"{name}_b"]  # noqa: E731
  dh = D // HEADS
  out = np.zeros(cand.shape)
  for b in range(B):
    add = np.where(mask[b], 0.0, -np.inf)                                 # A's additive mask
    keys, values = lin(x[b], "key"), lin(x[b], "value")                   # [T, D]
    for c in range(NCAND):
      ctx, state = cand[b, c, :K], cand[b, c, K]
      hint = ctx.mean(0)
      # Query rows as the code stacks them: the aggregation query, then the k context queries.
      rows = np.concatenate([lin(hint, "aggregate_query")[None], lin(ctx, "context_query")])
      ck, cv = lin(ctx, "context_key"), lin(ctx, "context_value")
      read = np.zeros((K + 1, D))
      for h in range(HEADS):
        sl = slice(h * dh, (h + 1) * dh)
        s_a = rows[:, sl] @ keys[:, sl].T / np.sqrt(dh) + add             # [k + 1, T]
        w = special.softmax(s_a[:1], axis=-1)                             # aggregation: A alone
        read[0, sl] = w @ values[:, sl]
        s_self = rows[1:, sl] @ ck[:, sl].T / np.sqrt(dh)                 # [k, k]
        w = special.softmax(np.concatenate([s_a[1:], s_self], axis=-1), axis=-1)
        read[1:, sl] = w[:, :T] @ values[:, sl] + w[:, T:] @ cv[:, sl]

      def ffn(y):
        inner = special.erf((y @ p["ffn_in_w"] + p["ffn_in_b"]) / np.sqrt(2))
        inner = 0.5 * (y @ p["ffn_in_w"] + p["ffn_in_b"]) * (1 + inner)
        return _ln(inner @ p["ffn_out_w"] + p["ffn_out_b"] + y, p["norm2_scale"], p["norm2_bias"])

      new_ctx = ffn(_ln(lin(read[1:], "out") + ctx, p["norm1_scale"], p["norm1_bias"]))
      this = lin(read[0], "out")
      g = special.expit(lin(np.concatenate([hint, this, state]), "gate"))
      new_state = ffn(_ln(g * this + (1 - g) * state, p["norm1_scale"], p["norm1_bias"]))
      out[b, c] = np.concatenate([new_ctx, new_state[None]])
  return out


def _fn():
  return jax.jit(lambda x, cand, mask, p: mix.mixencoder_light_cross_attention(
      x, cand, mask, num_heads=HEADS, **p))


def test_matches_a_numpy_rewrite_of_the_authors_code():
  x, cand, mask = _inputs()
  p = _params()
  np.testing.assert_allclose(_fn()(x, cand, mask, p), _np_mixencoder(x, cand, mask, p),
                             **tolerances.output(jnp.float32))


def test_each_candidate_is_scored_on_its_own():
  """Candidates in parallel: changing candidate 0 leaves the others' outputs, and reordering the
  candidates reorders the outputs and the scores."""
  x, cand, mask = _inputs()
  p, fn = _params(), _fn()
  base = np.asarray(fn(x, cand, mask, p))
  changed = cand.copy()
  changed[:, 0] = 3 * np.random.default_rng(7).normal(size=changed[:, 0].shape)
  moved = np.asarray(fn(x, changed, mask, p))
  np.testing.assert_allclose(moved[:, 1:], base[:, 1:], **tolerances.output(jnp.float32))
  assert tolerances.rel_rms(moved[:, 0], base[:, 0]) > tolerances.CHANGED_REL_RMS
  order = np.array([2, 0, 1])
  np.testing.assert_allclose(fn(x, cand[:, order], mask, p), base[:, order],
                             **tolerances.output(jnp.float32))
  np.testing.assert_allclose(mix.match_scores(jnp.asarray(base[:, order])),
                             np.asarray(mix.match_scores(jnp.asarray(base)))[:, order],
                             **tolerances.output(jnp.float32))


def _flops(num_candidates, t=256, d=32, k=2):
  x = jax.ShapeDtypeStruct((1, t, d), jnp.float32)
  cand = jax.ShapeDtypeStruct((1, num_candidates, k + 1, d), jnp.float32)
  layer = mix.MixEncoderLayer(num_heads=4)
  params = jax.eval_shape(layer.init, jax.random.PRNGKey(0), x, cand)
  cost = jax.jit(layer.apply).lower(params, x, cand).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def test_the_query_text_is_projected_once_for_all_candidates():
  """Encode the query once: an extra candidate costs the layer less than one projection of the
  query text's keys and values (2 · 2·T·D² FLOPs), which a per-candidate re-encoding would repeat;
  and the cost is linear in the number of candidates."""
  t, d = 256, 32
  one, five, nine = _flops(1, t, d), _flops(5, t, d), _flops(9, t, d)
  per_candidate = (nine - five) / 4
  assert per_candidate < 2 * 2 * t * d * d, (per_candidate, 4 * t * d * d)
  np.testing.assert_allclose(five - one, nine - five, rtol=0.05)


def test_a_fully_padded_text_reads_nothing_and_stays_finite():
  x, cand, _ = _inputs()
  p = _params()
  mask = np.zeros((B, T), bool)
  out = np.asarray(_fn()(x, cand, mask, p))
  assert np.isfinite(out).all()
  grads = jax.grad(lambda x: jnp.sum(jnp.sin(mix.mixencoder_light_cross_attention(
      x, cand, mask, num_heads=HEADS, **p))))(jnp.asarray(x))
  assert np.isfinite(np.asarray(grads)).all()
  np.testing.assert_array_equal(np.asarray(grads), 0.0)   # no real token of A is read


def test_candidate_contexts_are_learned_queries_over_the_real_tokens():
  rng = np.random.default_rng(3)
  states = rng.normal(size=(B, NCAND, 6, D)).astype(np.float32)
  mask = np.ones((B, NCAND, 6), bool)
  mask[0, 1, 4:] = False
  queries = rng.normal(size=(K, D)).astype(np.float32)
  got = np.asarray(mix.candidate_contexts(states, mask, queries=queries))
  s = np.einsum("kd,bnsd->bnks", queries.astype(np.float64), states)
  w = special.softmax(np.where(mask[:, :, None], s, -np.inf), axis=-1)
  np.testing.assert_allclose(got, np.einsum("bnks,bnsd->bnkd", w, states),
                             **tolerances.output(jnp.float32))


@pytest.mark.parametrize("which,match", [("x", "`x` must be"), ("candidates", "k >= 1"),
                                         ("mask", "`mask` must be")])
def test_bad_shapes_are_clear_errors(which, match):
  x, cand, mask = _inputs()
  args = {"x": x, "candidates": cand, "mask": mask}
  args[which] = {"x": x[0], "candidates": cand[:, :, :1], "mask": mask[:, :3]}[which]
  with pytest.raises(ValueError, match=match):
    mix.mixencoder_light_cross_attention(**args, num_heads=HEADS, **_params())
