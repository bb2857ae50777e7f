"""ASWL: layer-wise attention sets each layer's magnitude-pruning ratio while dense and sparse weights
are both tracked, so the sparse structure and the weights are learned together from scratch.

Paper: Qisheng He, Weisong Shi, Ming Dong, "Learning Pruned Structure and Weights Simultaneously
from Scratch: an Attention based Approach", arXiv:2111.02399. We could NOT reach the paper's method
section (only its abstract); the rule below follows the public code `kisonho/aswl` (TensorFlow),
which matches the abstract and appears to be the authors' (not confirmed). Its pieces, by file:

  layers.py      one scalar attention a_l per prunable layer, initialized to 0.5 and trained with the
                 weights; in training the layer's output is multiplied by a_l (`loss_fn` does this
                 here), and at export a_l is folded into the kernel (W ← a_l W).
  optimizers.py  pruning ratio  p_l = (1 - clip(a_l, 0.01, 1))^α   (α: "pruning factor", default 1)
                 so a layer with more attention is pruned less. Each step: the gradient is taken at
                 the sparse weights, applied to the dense ("uncompressed") weights and to a, then the
                 layer is re-pruned from its dense weights at the new p_l.
  compression.py magnitude pruning at ratio p of a layer of n weights: threshold m = the entry at
                 index min(⌊n p⌋, n - 1) of the sorted weights, keep |w| >= m.
  regularizers.py  R(a) = decay · (Σ_l (1 - p_l) n_l / Σ_l n_l - r)²  with p_l clipped to [0, 0.99]:
                 the kept fraction S is pulled to the target r (the code's model builder uses r = 0,
                 i.e. prune as much as the task loss allows; train.py defaults decay = 5, α = 1).

Deviations of ours: the code sorts the signed weights when it looks up the threshold m (it then
compares |w| to m); we sort |w|, which is what "magnitude pruning at ratio p" states, so exactly
⌊n p⌋ weights are pruned (without ties). The code multiplies the output by the unclipped a_l
(it computes a clipped copy and does not use it); we multiply by the clipped one in `layer_scale`.

Shapes: params and attentions are pytrees with the same structure; each params leaf is one layer's
kernel (any shape), each attentions leaf a scalar.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from attnjax import catalog
from attnjax.typing import Array, Bool, Float

__all__ = [
    "ATTENTION_INIT", "attention_penalty", "init_attentions", "layer_scale", "magnitude_mask",
    "prune", "pruning_ratios", "train_step",
]

ATTENTION_INIT = 0.5
_ATTENTION_MIN = 0.01
_PENALTY_RATIO_MAX = 0.99

Kernel = Float[Array, "..."]
KernelMask = Bool[Array, "..."]
PyTree = Any


def init_attentions(params: PyTree) -> PyTree:
  """One scalar attention per params leaf, 0.5 as in the reference code."""
  return jax.tree_util.tree_map(lambda _: jnp.float32(ATTENTION_INIT), params)


def layer_scale(attention: jax.Array) -> jax.Array:
  """The factor a layer's output is multiplied by in training: clip(a, 0.01, 1)."""
  return jnp.clip(attention, _ATTENTION_MIN, 1.0)


@catalog.serves(169, kind="training", name="attnjax.train.pruning.pruning_ratios")
def pruning_ratios(attentions: PyTree, pruning_factor: float = 1.0) -> PyTree:
  """p_l = (1 - clip(a_l, 0.01, 1))^α per layer: decreasing in the attention, in [0, 0.99^α]."""
  if pruning_factor <= 0:
    raise ValueError(f"pruning_ratios: pruning_factor (α) must be > 0, got {pruning_factor}")
  return jax.tree_util.tree_map(lambda a: (1.0 - layer_scale(a)) ** pruning_factor, attentions)


def magnitude_mask(w: Kernel, ratio: float | jax.Array) -> KernelMask:
  """True where a weight of `w` is kept when pruning the fraction `ratio` of smallest magnitudes:
  keep |w| >= the entry at index min(⌊n ratio⌋, n - 1) of the sorted |w| (n = w.size)."""
  n = w.size
  if n == 0:
    raise ValueError("magnitude_mask: w must have at least one entry")
  mags = jnp.abs(w)
  index = jnp.clip(jnp.floor(n * ratio).astype(jnp.int32), 0, n - 1)
  threshold = jnp.sort(mags.reshape(-1))[index]
  return mags >= threshold


def _check_same_structure(params: PyTree, attentions: PyTree, fn: str) -> None:
  ps, as_ = jax.tree_util.tree_structure(params), jax.tree_util.tree_structure(attentions)
  if ps != as_:
    raise ValueError(f"{fn}: attentions must have the structure of params (one scalar per kernel); "
                     f"got {as_} for params {ps}")
  for a in jax.tree_util.tree_leaves(attentions):
    if jnp.ndim(a) != 0:
      raise ValueError(f"{fn}: each attention must be a scalar [], got shape {jnp.shape(a)}")


def prune(params: PyTree, attentions: PyTree, pruning_factor: float = 1.0) -> PyTree:
  """The sparse weights: each dense kernel magnitude-pruned at its layer's ratio p_l."""
  _check_same_structure(params, attentions, "prune")
  ratios = pruning_ratios(attentions, pruning_factor)
  return jax.tree_util.tree_map(lambda w, p: jnp.where(magnitude_mask(w, p), w, 0), params, ratios)


def attention_penalty(attentions: PyTree, params: PyTree, *, decay: float = 5.0,
                      pruning_factor: float = 1.0, target: float = 0.0) -> jax.Array:
  """decay · (S - r)², S = Σ_l (1 - p_l) n_l / Σ_l n_l the kept fraction (p_l clipped to 0.99),
  n_l the size of layer l's kernel, r = `target` (reference code: 0)."""
  _check_same_structure(params, attentions, "attention_penalty")
  ratios = jax.tree_util.tree_leaves(pruning_ratios(attentions, pruning_factor))
  sizes = jnp.asarray([w.size for w in jax.tree_util.tree_leaves(params)], jnp.float32)
  kept = 1.0 - jnp.clip(jnp.stack(ratios), 0.0, _PENALTY_RATIO_MAX)
  return decay * (jnp.sum(kept * sizes) / jnp.sum(sizes) - target) ** 2


def train_step(loss_fn: Callable[..., jax.Array], dense: PyTree, attentions: PyTree,
               opt_state: optax.OptState, optimizer: optax.GradientTransformation, batch: Any, *,
               pruning_factor: float = 1.0, decay: float = 5.0, target: float = 0.0):
  """One ASWL step (reference optimizers.py): forward and gradient at the sparse weights, update of
  the dense weights and the attentions with those gradients.

  Args:
    loss_fn: `(sparse_params, attentions, batch) -> task loss`; it multiplies each layer's output
      by `layer_scale(attention)`.
    dense: the dense kernels (the optimizer's parameters).
    attentions: one scalar per kernel.
    opt_state: `optimizer.init((dense, attentions))`.
    optimizer: any optax transformation (reference: SGD with momentum 0.9).
    batch: passed to `loss_fn`.

  Returns:
    `(dense, attentions, opt_state, loss)` after the update; `prune(dense, attentions)` is the
    sparse model for the next step (and for evaluation).
  """
  sparse = prune(dense, attentions, pruning_factor)

  def total(sparse, attentions):
    return loss_fn(sparse, attentions, batch) + attention_penalty(
        attentions, sparse, decay=decay, pruning_factor=pruning_factor, target=target)

  loss, grads = jax.value_and_grad(total, argnums=(0, 1))(sparse, attentions)
  # The gradient w.r.t. the sparse weights updates the dense ones, pruned entries included, so a
  # pruned weight keeps learning and comes back when its magnitude passes the threshold.
  updates, opt_state = optimizer.update(grads, opt_state, (dense, attentions))
  dense, attentions = optax.apply_updates((dense, attentions), updates)
  return dense, attentions, opt_state, loss
