"""Deceptive-attention penalty (#37): the formula against a float64 loop over layers, heads and
queries, and the claim: a short training run with the penalty moves a tiny LM's attention off the
impermissible tokens while its task loss still falls."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from attnjax.nn.attention import CAPTURE
from attnjax.train.regularizers import deceive, maps
from tests import tolerances
from tests.train import fakes_test


def _reference(weights, impermissible, eps):
  terms = []
  for w in weights:
    w = np.asarray(w, np.float64)
    b_, n_, t_, _ = w.shape
    logs = [-np.log(max(1.0 - sum(w[b, n, t, s] for s in np.flatnonzero(impermissible[b])), eps))
            for b in range(b_) for n in range(n_) for t in range(t_)]
    terms.append(np.mean(logs))
  return np.mean(terms)


def test_penalty_matches_a_loop_over_rows():
  rng = np.random.default_rng(0)
  weights = [jax.nn.softmax(jnp.asarray(rng.standard_normal((2, 3, 4, 5)) * 2, jnp.float32))
             for _ in range(2)]
  impermissible = np.zeros((2, 5), bool)
  impermissible[0, [1, 3]] = True
  impermissible[1, 4] = True
  # A row entirely on I: the clamp keeps the log finite.
  weights[1] = weights[1].at[1, 0, 0].set(jnp.eye(5)[4])
  got = deceive.deception_penalty(weights, jnp.asarray(impermissible), eps=1e-6)
  np.testing.assert_allclose(got, _reference(weights, impermissible, 1e-6),
                             **tolerances.output(jnp.float32))
  assert np.isfinite(jax.grad(lambda w: deceive.deception_penalty(
      [w], jnp.asarray(impermissible)))(weights[0])).all()


def test_training_with_the_penalty_hides_impermissible_tokens_and_still_learns():
  # Next-token copy of the previous token: the query must attend to position t-1; token 1 is
  # impermissible and frequent.
  model = fakes_test.TinyLM(vocab_size=8, width=16, num_heads=2, mlp_dim=32)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 8, (16, 8))
  tokens[rng.random(tokens.shape) < 0.4] = 1
  inputs = jnp.asarray(tokens, jnp.int32)
  targets = jnp.asarray(np.concatenate([tokens[:, :1], tokens[:, :-1]], 1), jnp.int32)
  impermissible = inputs == 1
  # Rows that see a permissible key (causal): only those can move their mass off I.
  free = jnp.asarray(np.cumsum(tokens != 1, axis=1) > 0)
  params = model.init(jax.random.PRNGKey(0), inputs)["params"]
  tx = optax.adam(1e-2)

  def losses(p):
    logits, state = model.apply({"params": p}, inputs, mutable=[CAPTURE])
    task = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    weights, _ = maps.sown_maps(state)
    mass = (deceive.impermissible_mass(weights[0], impermissible) * free[:, None]).sum() / (
        free.sum() * weights[0].shape[1])
    return task, deceive.deception_penalty(weights, impermissible), mass

  def train(lam):
    @jax.jit
    def step(p, opt):
      grads = jax.grad(lambda q: (lambda t, r, _: t + lam * r)(*losses(q)))(p)
      updates, opt = tx.update(grads, opt, p)
      return optax.apply_updates(p, updates), opt

    p, opt = params, tx.init(params)
    for _ in range(80):
      p, opt = step(p, opt)
    return jax.jit(losses)(p)

  task0, _, mass0 = jax.jit(losses)(params)
  task_plain, _, mass_plain = train(0.0)
  task_hidden, _, mass_hidden = train(1.0)
  assert mass0 > 0.2 and mass_plain > 0.2, (mass0, mass_plain)  # the tokens are attended
  assert mass_hidden < 0.05, (mass_plain, mass_hidden)
  assert task_hidden < task0 - 0.3, (task0, task_hidden)
