"""Tests of attnjax.analysis.dagcd (#72) against a loop rewrite of the authors' rule, and the greedy
loop on a tiny decoder against the same steps by hand."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from attnjax import models
from attnjax.analysis import dagcd
from attnjax.analysis.capture import CAPTURE, from_state
from attnjax.data.base import TaskSpec
from tests import tolerances

TOL = tolerances.output(jnp.float32)


def _loop_utilization(att, ids, p, w, top_rank):
  """The authors' steps for one example: per head the mean attention of each distinct id,
  normalized over the distinct ids; the weighted sum over heads on the ids ranked <= top_rank."""
  distinct = sorted(set(ids.tolist()))
  ratio = np.array([[np.mean([att[m, s] for s in range(len(ids)) if ids[s] == i]) for i in distinct]
                    for m in range(att.shape[0])])
  ratio /= ratio.sum(-1, keepdims=True)
  order = list(np.argsort(-p, kind="stable"))
  u = np.zeros(len(p))
  for j, i in enumerate(distinct):
    if order.index(i) + 1 <= top_rank:
      u[i] = (ratio[:, j] * w).sum()
  return u / u.sum() if u.sum() > 0 else u


def test_utilization_and_distribution_against_loops():
  rng = np.random.default_rng(0)
  B, M, S, V = 2, 3, 6, 12
  att = rng.dirichlet(np.ones(S), size=(B, M)).astype(np.float32)
  ids = np.array([[3, 5, 3, 7, 1, 5], [0, 0, 2, 9, 4, 11]])
  logits = rng.normal(size=(B, V)).astype(np.float32)
  p = np.asarray(jax.nn.softmax(logits, -1))
  w = np.array([0.5, 0.2, 0.3], np.float32)
  for top_rank in (V, 4):
    u = np.asarray(dagcd.utilization_distribution(att, ids, p, w, top_rank))
    want = np.stack([_loop_utilization(att[b], ids[b], p[b], w, top_rank) for b in range(B)])
    np.testing.assert_allclose(u, want, **TOL)
    outside = ~np.stack([np.isin(np.arange(V), ids[b]) for b in range(B)])
    assert np.all(u[outside] == 0)
    # A distribution over the kept ids, or all zeros when the model ranks no context id that high.
    assert set(np.round(u.sum(-1), 5)) <= {0.0, 1.0} and (top_rank < V or np.all(u.sum(-1) > 0))
  # The rank constraint drops context ids the model ranks low.
  assert (u > 0).sum() < (np.asarray(dagcd.utilization_distribution(att, ids, p, w, V)) > 0).sum()
  out = np.asarray(dagcd.dagcd_distribution(logits, u, alpha=2.0))
  entropy = -(p * np.log(p)).sum(-1) / np.log(V)
  np.testing.assert_allclose(out, p + 2.0 * entropy[:, None] * u, **TOL)
  np.testing.assert_allclose(dagcd.dagcd_distribution(logits, u, alpha=0.0), p, **TOL)
  # A certain model (one-hot p, entropy 0) gets no boost.
  sure = np.full((1, V), -1e9, np.float32)
  sure[0, 2] = 0.0
  np.testing.assert_allclose(dagcd.dagcd_distribution(sure, u[:1], alpha=5.0),
                             np.eye(V)[2:3], **TOL)
  with pytest.raises(ValueError, match=r"context_ids \[B, S_ctx\]"):
    dagcd.utilization_distribution(att, ids[:, :3], p)


def test_generate_equals_the_steps_by_hand():
  v, t = 20, 10
  spec = TaskSpec(name="toy_lm", kind="lm", input_shape=(t,), input_dtype="int32", vocab_size=v,
                  num_classes=v, seq_len=t)
  model = models.build_model(ml_collections.ConfigDict(dict(
      arch="decoder_lm", width=16, depth=1, num_heads=2, mlp_dim=32, mechanism="softmax",
      rope_base=10000.0, tie_embeddings=True)), spec)
  prompt = np.asarray(jax.random.randint(jax.random.PRNGKey(0), (2, 6), 0, v, jnp.int32))
  variables = jax.jit(model.init)(jax.random.PRNGKey(1), prompt)
  heads = [(0, 1), (0, 0)]
  got = dagcd.dagcd_generate(model, variables, prompt, (1, 5), 2, heads, alpha=50.0, top_rank=v)
  forward = jax.jit(lambda variables, x: model.apply(variables, x, mutable=[CAPTURE]))
  tokens, boosted = prompt, False
  for _ in range(2):
    logits, state = forward(variables, tokens)
    w = from_state(state).weights
    att = np.stack([w[l, :, h, -1, 1:5] for l, h in heads], axis=1)
    u = dagcd.utilization_distribution(att, tokens[:, 1:5], jax.nn.softmax(logits[:, -1], -1),
                                       top_rank=v)
    nxt = np.asarray(jnp.argmax(dagcd.dagcd_distribution(logits[:, -1], u, 50.0), -1))
    boosted |= bool((nxt != np.asarray(jnp.argmax(logits[:, -1], -1))).any())
    tokens = np.concatenate([tokens, nxt[:, None].astype(tokens.dtype)], 1)
  np.testing.assert_array_equal(got, tokens)
  assert boosted                                   # the context boost changed some choice
