"""Adversarial training on attention scores: AT (Kitada & Iyatomi, "Attention Meets Perturbations:
Robust and Interpretable Attention with Adversarial Training", arXiv:2009.12064) and VAT (Kitada &
Iyatomi, "Making Attention Mechanisms More Robust and Interpretable with Virtual Adversarial
Training", arXiv:2104.08763).

Both perturb the pre-softmax scores of an attention-pooling layer: the model is any function
`logits = f(params, batch, score_delta)` whose layer adds `score_delta` `[B, T]` to its scores.

  AT:  g = ∇_δ CE(f(θ, x, δ), y) |_{δ=0},   r_adv = ε g / ||g||,
       loss = CE(f(θ, x, r_adv), y)                          (r_adv held constant)
  VAT: d ~ N(0, I),  r = ξ d / ||d||,  g = ∇_r KL(p(·|x) || p(·|x, r)),  r_adv = ε g / ||g||,
       loss = KL(p(·|x) || p(·|x, r_adv))                     (p(·|x) and r_adv held constant)

(one power-iteration step, as in Miyato et al.'s VAT), with ||·|| the L2 norm of each example's
scores perturbation. VAT needs no labels, so it also trains on unlabelled text. Total training loss:
CE + λ · (AT or VAT loss). `AttentionPoolingClassifier` is the papers' kind of model (embedding,
additive attention pooling, linear) to use them with.

The "interpretable" variants iAT and iVAT restrict the perturbation of example i to the directions
towards the other examples' scores in the batch (Sato et al.'s iAdvT-Text construction, applied to
attention by both papers), so the adversary can only make i's attention more like another
sentence's:

  d_ik = (s_k - s_i) / ||s_k - s_i||   (k ≠ i; d_ii = 0),   r_i(w) = Σ_k w_ik d_ik
  iAT:  g = ∇_w CE(f(θ, x, r(w)), y) |_{w=0},   w_adv = ε g / ||g||   (norm over k, per example)
  iVAT: w ~ ξ·unit(N(0, I)),  g = ∇_w KL(p(·|x) || p(·|x, r(w))),   w_adv = ε g / ||g||

and the loss is AT's / VAT's at r(w_adv), with s the clean scores (held constant). The authors'
released code for iAT takes its final direction from the gradient with respect to r itself, which
drops the d_ik; we follow the papers' formulas.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from attnjax.train.regularizers.maps import Scalar, serves
from attnjax.typing import Array, Float, Int, Lengths

__all__ = ["AttentionPoolingClassifier", "at_loss", "at_perturbation", "difference_directions",
           "iat_loss", "iat_perturbation", "ivat_loss", "ivat_perturbation", "vat_loss",
           "vat_perturbation"]

ScoreFn = Callable[[Any, Any, jnp.ndarray], jnp.ndarray]
Scores = Float[Array, "B T"]
Tokens = Int[Array, "B T"]
Labels = Int[Array, "B"]
Directions = Float[Array, "B B2 T"]   # per example, a unit vector towards each example of the batch

# Guards the normalization of an all-zero gradient (e.g. a saturated example) against 0/0.
_NORM_FLOOR = 1e-12


@serves(2, 40, kind="layer")
class AttentionPoolingClassifier(nn.Module):
  """Text classifier: e_t = E[x_t]; s_t = vᵀ tanh(W e_t + b) + δ_t (additive attention scores plus
  the perturbation); α = softmax over the first `lengths` tokens; logits = U Σ_t α_t e_t + c.
  Call as `apply(variables, tokens [B, T], lengths [B], score_delta [B, T] or None)`; with
  `return_attention=True` also returns α `[B, T]`, with `return_scores=True` the scores s `[B, T]`
  (before the perturbation) that iAT / iVAT take their directions from."""
  vocab_size: int
  num_classes: int
  width: int = 32

  @nn.compact
  def __call__(self, tokens: Tokens, lengths: Lengths,
               score_delta: Optional[Scores] = None, *, return_attention: bool = False,
               return_scores: bool = False):
    e = nn.Embed(self.vocab_size, self.width, name="embed")(tokens)
    scores = nn.Dense(1, use_bias=False, name="score")(
        jnp.tanh(nn.Dense(self.width, name="hidden")(e)))[..., 0]
    clean_scores = scores
    if score_delta is not None:
      if score_delta.shape != scores.shape:
        raise ValueError(f"AttentionPoolingClassifier: score_delta must be [B, T] = "
                         f"{scores.shape}, got {score_delta.shape}")
      scores = scores + score_delta
    valid = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]
    alpha = jax.nn.softmax(jnp.where(valid, scores, -jnp.inf), axis=-1)
    logits = nn.Dense(self.num_classes, name="out")(jnp.einsum("bt,btd->bd", alpha, e))
    extras = (alpha,) * return_attention + (clean_scores,) * return_scores
    return (logits, *extras) if extras else logits


def _unit(g: jnp.ndarray) -> jnp.ndarray:
  axes = tuple(range(1, g.ndim))
  return g / jnp.maximum(jnp.sqrt(jnp.sum(g * g, axis=axes, keepdims=True)), _NORM_FLOOR)


def _kl(clean_logits, logits):
  p = jax.nn.softmax(clean_logits)
  return jnp.sum(p * (jax.nn.log_softmax(clean_logits) - jax.nn.log_softmax(logits)), -1).mean()


@serves(40, kind="loss")
def at_perturbation(f: ScoreFn, params: Any, batch: Any, labels: Labels,
                    score_shape: tuple[int, ...], *, epsilon: float = 1.0) -> Scores:
  """r_adv = ε g/||g||, g the cross-entropy gradient w.r.t. the scores at δ = 0 (constant)."""
  def ce(delta):
    return optax.softmax_cross_entropy_with_integer_labels(f(params, batch, delta), labels).sum()
  g = jax.grad(ce)(jnp.zeros(score_shape, jnp.float32))
  return jax.lax.stop_gradient(epsilon * _unit(g))


@serves(40, kind="loss")
def at_loss(f: ScoreFn, params: Any, batch: Any, labels: Labels,
            score_shape: tuple[int, ...], *, epsilon: float = 1.0) -> Scalar:
  """Mean cross-entropy under the AT perturbation (module docstring)."""
  r_adv = at_perturbation(f, params, batch, labels, score_shape, epsilon=epsilon)
  return optax.softmax_cross_entropy_with_integer_labels(f(params, batch, r_adv), labels).mean()


@serves(2, kind="loss")
def vat_perturbation(f: ScoreFn, params: Any, batch: Any, rng: jax.Array,
                     score_shape: tuple[int, ...], *, epsilon: float = 1.0,
                     xi: float = 1e-3) -> Scores:
  """One power-iteration step from a random direction (module docstring). `xi` is the probe's
  norm: Miyato et al. use 1e-6 in their setting; 1e-3 keeps the float32 KL gradient above
  rounding noise."""
  clean = jax.lax.stop_gradient(f(params, batch, jnp.zeros(score_shape, jnp.float32)))
  d = xi * _unit(jax.random.normal(rng, score_shape, jnp.float32))
  g = jax.grad(lambda r: _kl(clean, f(params, batch, r)))(d)
  return jax.lax.stop_gradient(epsilon * _unit(g))


@serves(2, kind="loss")
def vat_loss(f: ScoreFn, params: Any, batch: Any, rng: jax.Array, score_shape: tuple[int, ...], *,
             epsilon: float = 1.0, xi: float = 1e-3) -> Scalar:
  """KL(p(·|x) || p(·|x, r_adv)) with the clean prediction held constant (module docstring)."""
  clean = jax.lax.stop_gradient(f(params, batch, jnp.zeros(score_shape, jnp.float32)))
  r_adv = vat_perturbation(f, params, batch, rng, score_shape, epsilon=epsilon, xi=xi)
  return _kl(clean, f(params, batch, r_adv))


def _unit_last(x: jnp.ndarray) -> jnp.ndarray:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), _NORM_FLOOR)


@serves(2, 40, kind="loss")
def difference_directions(scores: Scores) -> Directions:
  """d_ik = (s_k - s_i) / ||s_k - s_i|| over the batch (module docstring); d_ii = 0. `scores` are
  the clean scores, padded positions included (the classifier masks them after the perturbation)."""
  if scores.ndim != 2:
    raise ValueError(f"difference_directions: scores must be [B, T], got {scores.shape}")
  diff = jax.lax.stop_gradient(scores)[None, :, :] - jax.lax.stop_gradient(scores)[:, None, :]
  return _unit_last(diff)


def _combine(w: jnp.ndarray, directions: jnp.ndarray) -> jnp.ndarray:
  return jnp.einsum("bk,bkt->bt", w, directions)


@serves(40, kind="loss")
def iat_perturbation(f: ScoreFn, params: Any, batch: Any, labels: Labels, scores: Scores, *,
                     epsilon: float = 1.0) -> Scores:
  """r(w_adv) of iAT (module docstring): ε-norm weights over the directions to the other
  examples' `scores` `[B, T]`, chosen by the cross-entropy gradient at w = 0 (constant)."""
  directions = difference_directions(scores)
  n = scores.shape[0]

  def ce(w):
    logits = f(params, batch, _combine(w, directions))
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()

  g = jax.grad(ce)(jnp.zeros((n, n), jnp.float32))
  return jax.lax.stop_gradient(_combine(epsilon * _unit_last(g), directions))


@serves(40, kind="loss")
def iat_loss(f: ScoreFn, params: Any, batch: Any, labels: Labels, scores: Scores, *,
             epsilon: float = 1.0) -> Scalar:
  """Mean cross-entropy under the iAT perturbation (module docstring)."""
  r_adv = iat_perturbation(f, params, batch, labels, scores, epsilon=epsilon)
  return optax.softmax_cross_entropy_with_integer_labels(f(params, batch, r_adv), labels).mean()


@serves(2, kind="loss")
def ivat_perturbation(f: ScoreFn, params: Any, batch: Any, rng: jax.Array, scores: Scores, *,
                      epsilon: float = 1.0, xi: float = 1e-3) -> Scores:
  """r(w_adv) of iVAT (module docstring): one power-iteration step on the weights over the
  directions to the other examples' `scores`, from a random start of norm `xi`."""
  directions = difference_directions(scores)
  n = scores.shape[0]
  clean = jax.lax.stop_gradient(f(params, batch, jnp.zeros(scores.shape, jnp.float32)))
  w0 = xi * _unit_last(jax.random.normal(rng, (n, n), jnp.float32))
  g = jax.grad(lambda w: _kl(clean, f(params, batch, _combine(w, directions))))(w0)
  return jax.lax.stop_gradient(_combine(epsilon * _unit_last(g), directions))


@serves(2, kind="loss")
def ivat_loss(f: ScoreFn, params: Any, batch: Any, rng: jax.Array, scores: Scores, *,
              epsilon: float = 1.0, xi: float = 1e-3) -> Scalar:
  """KL(p(·|x) || p(·|x, r(w_adv))) with the clean prediction held constant (module docstring)."""
  clean = jax.lax.stop_gradient(f(params, batch, jnp.zeros(scores.shape, jnp.float32)))
  r_adv = ivat_perturbation(f, params, batch, rng, scores, epsilon=epsilon, xi=xi)
  return _kl(clean, f(params, batch, r_adv))
