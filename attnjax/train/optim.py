"""Optimizer from config: AdamW with warm-up + cosine (or constant) learning rate, gradient clipping
by global norm and optional gradient accumulation.

    lr(u) = peak · u / warmup                                  u < warmup
          = end + (peak - end) · (1 + cos(π (u - warmup) / (U - warmup))) / 2   (cosine)
          = peak                                               (constant)

u counts optimizer updates. With `grad_accum_steps = k` (optax.MultiSteps) every train step is one
micro-batch and the update is applied every k steps on the mean gradient, so U = num_steps // k.
Weight decay (decoupled; Loshchilov & Hutter, "Decoupled Weight Decay Regularization",
arXiv:1711.05101) applies to matrices only (ndim >= 2), not to biases, norms' scales or gates.
"""

from __future__ import annotations

import jax
import ml_collections
import optax

OPTIMIZERS = ("adamw",)
DECAYS = ("cosine", "constant")


def learning_rate_schedule(config: ml_collections.ConfigDict, num_updates: int) -> optax.Schedule:
  """Warm-up then cosine decay to `end_learning_rate_factor · peak` (default 0), or constant."""
  peak = float(config.learning_rate)
  warmup = int(config.get("warmup_steps", 0))
  if config.get("decay", "cosine") == "constant":
    if warmup == 0:
      return optax.constant_schedule(peak)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup])
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup,
      decay_steps=max(num_updates, warmup + 1),
      end_value=peak * float(config.get("end_learning_rate_factor", 0.0)))


def _decay_mask(params):
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(config: ml_collections.ConfigDict, num_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optax transformation for `config` (config.optimizer) and its learning-rate schedule.

  Args:
    config: name ("adamw"), learning_rate, warmup_steps, decay, weight_decay, b1, b2, eps,
      clip_norm (None or <= 0: no clipping), grad_accum_steps.
    num_steps: train steps (micro-batches) of the run.
  """
  if config.get("name", "adamw") != "adamw":
    raise ValueError(f"optimizer.name: unknown optimizer {config.name!r}; known: {OPTIMIZERS}")
  accum = int(config.get("grad_accum_steps", 1) or 1)
  schedule = learning_rate_schedule(config, max(num_steps // accum, 1))
  parts = []
  clip = config.get("clip_norm", None)
  if clip is not None and clip > 0:
    parts.append(optax.clip_by_global_norm(float(clip)))
  parts.append(optax.adamw(schedule, b1=float(config.get("b1", 0.9)),
                           b2=float(config.get("b2", 0.999)), eps=float(config.get("eps", 1e-8)),
                           weight_decay=float(config.get("weight_decay", 0.0)), mask=_decay_mask))
  tx = optax.chain(*parts)
  if accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accum)
  return tx, schedule
