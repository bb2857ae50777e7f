"""AT / iAT and VAT / iVAT on attention scores (#40, #2) with the attention-pooling classifier: the
pooling against an explicit float64 additive-attention rewrite, the perturbations' norm ε, and the
claims: AT's perturbation raises the loss more than random perturbations of the same norm, VAT's
raises the KL it maximizes more than random ones, iAT's / iVAT's lie in the span of the directions
to the other examples' scores and beat random combinations of them; the losses differentiate to
finite gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from attnjax.train.regularizers import adversarial
from tests import tolerances

B, T, V, C = 6, 7, 20, 3


def _setup():
  model = adversarial.AttentionPoolingClassifier(vocab_size=V, num_classes=C, width=16)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
  lengths = jnp.asarray([7, 5, 3, 7, 6, 2], jnp.int32)
  labels = jnp.asarray(rng.integers(0, C, (B,)), jnp.int32)
  params = model.init(jax.random.PRNGKey(0), tokens, lengths)["params"]
  f = lambda p, batch, delta: model.apply({"params": p}, *batch, delta)
  return model, params, (tokens, lengths), labels, f


def test_pooling_matches_an_explicit_rewrite():
  model, params, (tokens, lengths), _, f = _setup()
  delta = np.random.default_rng(1).standard_normal((B, T))
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  for b in range(B):
    n = int(lengths[b])
    e = p["embed"]["embedding"][np.asarray(tokens[b, :n])]
    s = np.tanh(e @ p["hidden"]["kernel"] + p["hidden"]["bias"]) @ p["score"]["kernel"][:, 0]
    s = s + delta[b, :n]
    a = np.exp(s - s.max())
    a /= a.sum()
    want = (a @ e) @ p["out"]["kernel"] + p["out"]["bias"]
    got = f(params, (tokens, lengths), jnp.asarray(delta, jnp.float32))[b]
    np.testing.assert_allclose(got, want, **tolerances.output(jnp.float32))


def test_at_perturbation_raises_the_loss_more_than_random_ones():
  _, params, batch, labels, f = _setup()
  eps = 2.0
  ce = jax.jit(lambda d: optax.softmax_cross_entropy_with_integer_labels(
      f(params, batch, d), labels))
  r_adv = adversarial.at_perturbation(f, params, batch, labels, (B, T), epsilon=eps)
  np.testing.assert_allclose(np.linalg.norm(r_adv, axis=1), eps, **tolerances.output(jnp.float32))
  clean = ce(jnp.zeros((B, T)))
  rng = np.random.default_rng(2)
  randoms = [eps * jnp.asarray(adversarial._unit(rng.standard_normal((B, T))), jnp.float32)
             for _ in range(16)]
  rise_random = np.mean([np.asarray(ce(r) - clean) for r in randoms], axis=0)
  rise_adv = np.asarray(ce(r_adv) - clean)
  assert np.all(rise_adv > 0), rise_adv
  assert np.all(rise_adv > rise_random), (rise_adv, rise_random)
  loss = adversarial.at_loss(f, params, batch, labels, (B, T), epsilon=eps)
  np.testing.assert_allclose(loss, rise_adv.mean() + clean.mean(), **tolerances.output(jnp.float32))
  grads = jax.grad(lambda p: adversarial.at_loss(f, p, batch, labels, (B, T)))(params)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_vat_perturbation_raises_the_kl_more_than_random_ones():
  _, params, batch, _, f = _setup()
  eps = 2.0
  clean = f(params, batch, jnp.zeros((B, T)))
  p = jax.nn.softmax(clean)

  def kl(d):   # per example, float64 from the float32 logits
    q = np.asarray(jax.nn.log_softmax(f(params, batch, d)), np.float64)
    return np.sum(np.asarray(p, np.float64) * (np.log(np.asarray(p, np.float64)) - q), -1)

  r_adv = adversarial.vat_perturbation(f, params, batch, jax.random.PRNGKey(3), (B, T),
                                       epsilon=eps)
  np.testing.assert_allclose(np.linalg.norm(r_adv, axis=1), eps, **tolerances.output(jnp.float32))
  rng = np.random.default_rng(4)
  randoms = [eps * jnp.asarray(adversarial._unit(rng.standard_normal((B, T))), jnp.float32)
             for _ in range(16)]
  kl_random = np.mean([kl(r) for r in randoms], axis=0)
  kl_adv = kl(r_adv)
  assert np.all(kl_adv > kl_random), (kl_adv, kl_random)
  loss = adversarial.vat_loss(f, params, batch, jax.random.PRNGKey(3), (B, T), epsilon=eps)
  np.testing.assert_allclose(loss, kl_adv.mean(), **tolerances.output(jnp.float32))
  grads = jax.grad(lambda q: adversarial.vat_loss(f, q, batch, jax.random.PRNGKey(3), (B, T)))(
      params)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def _scores(params, batch):
  model = adversarial.AttentionPoolingClassifier(vocab_size=V, num_classes=C, width=16)
  _, scores = model.apply({"params": params}, *batch, return_scores=True)
  return scores


def _random_combinations(directions, eps, count, seed):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    w = rng.standard_normal((B, B))
    w = eps * w / np.linalg.norm(w, axis=1, keepdims=True)
    out.append(jnp.einsum("bk,bkt->bt", jnp.asarray(w, jnp.float32), directions))
  return out


def test_difference_directions_point_at_the_other_examples():
  _, params, batch, _, _ = _setup()
  scores = np.asarray(_scores(params, batch), np.float64)
  d = np.asarray(adversarial.difference_directions(jnp.asarray(scores, jnp.float32)))
  for i in range(B):
    np.testing.assert_allclose(d[i, i], 0.0, **tolerances.output(jnp.float32))
    for k in set(range(B)) - {i}:
      want = (scores[k] - scores[i]) / np.linalg.norm(scores[k] - scores[i])
      np.testing.assert_allclose(d[i, k], want, **tolerances.output(jnp.float32))


def test_iat_perturbation_is_a_combination_of_directions_that_raises_the_loss_most():
  _, params, batch, labels, f = _setup()
  eps = 2.0
  scores = _scores(params, batch)
  directions = adversarial.difference_directions(scores)
  r_adv = adversarial.iat_perturbation(f, params, batch, labels, scores, epsilon=eps)
  # r_i lies in the span of i's directions, with weights of norm ε.
  for i in range(B):
    basis = np.asarray(directions[i], np.float64).T        # [T, B]
    w, *_ = np.linalg.lstsq(basis, np.asarray(r_adv[i], np.float64), rcond=None)
    np.testing.assert_allclose(basis @ w, r_adv[i], **tolerances.output(jnp.float32))
  ce = jax.jit(lambda d: optax.softmax_cross_entropy_with_integer_labels(
      f(params, batch, d), labels))
  clean = ce(jnp.zeros((B, T)))
  rise_adv = np.asarray(ce(r_adv) - clean)
  rise_random = np.mean([np.asarray(ce(r) - clean)
                         for r in _random_combinations(directions, eps, 16, 5)], axis=0)
  assert np.all(rise_adv > 0), rise_adv
  assert np.all(rise_adv > rise_random), (rise_adv, rise_random)
  loss = adversarial.iat_loss(f, params, batch, labels, scores, epsilon=eps)
  np.testing.assert_allclose(loss, rise_adv.mean() + clean.mean(), **tolerances.output(jnp.float32))
  grads = jax.grad(lambda p: adversarial.iat_loss(f, p, batch, labels, scores))(params)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_ivat_perturbation_raises_the_kl_more_than_random_combinations():
  _, params, batch, _, f = _setup()
  eps = 2.0
  scores = _scores(params, batch)
  directions = adversarial.difference_directions(scores)
  p = np.asarray(jax.nn.softmax(f(params, batch, jnp.zeros((B, T)))), np.float64)

  def kl(d):
    q = np.asarray(jax.nn.log_softmax(f(params, batch, d)), np.float64)
    return np.sum(p * (np.log(p) - q), -1)

  r_adv = adversarial.ivat_perturbation(f, params, batch, jax.random.PRNGKey(6), scores,
                                        epsilon=eps)
  kl_random = np.mean([kl(r) for r in _random_combinations(directions, eps, 16, 7)], axis=0)
  kl_adv = kl(r_adv)
  # One power-iteration step from a random start in the B-dimensional weight space approximates
  # the top direction: the batch KL it maximizes beats random weights, not necessarily each row.
  assert kl_adv.mean() > 2 * kl_random.mean(), (kl_adv, kl_random)
  loss = adversarial.ivat_loss(f, params, batch, jax.random.PRNGKey(6), scores, epsilon=eps)
  np.testing.assert_allclose(loss, kl_adv.mean(), **tolerances.output(jnp.float32))
