"""A Perceiver classifier over token sequences, and the run that compares it with a transformer
encoder on a long-input task.

  PerceiverClassifier(vocab_size, num_classes, ...)   tokens [B, T] → embedding → Perceiver
      (`attnjax.cross.perceiver`, padding masked out of the cross-attention) → mean over the
      latents → LayerNorm → logits [B, C] (the paper's classification head, arXiv:2103.03206 Sec. 3)
  train_classifier(model, task, steps, ...)           Adam on the task's batches; returns held-out
      accuracy, the training time per step and the compiled FLOPs of one forward

`experiments/perceiver_listops.py` runs both models on ListOps (`attnjax.data.ListOps`) at growing
lengths; docs/results.md records it.
"""

from __future__ import annotations

import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from attnjax.cross.perceiver import Perceiver

__all__ = ["PerceiverClassifier", "forward_flops", "train_classifier"]


class PerceiverClassifier(nn.Module):
  """Token classifier on the Perceiver (module docstring); token `pad_id` is masked out."""
  vocab_size: int
  num_classes: int
  width: int = 64
  num_latents: int = 32
  latent_dim: int = 64
  num_blocks: int = 2
  latent_layers: int = 2
  num_heads: int = 4
  num_bands: int = 16
  pad_id: int = 0

  @nn.compact
  def __call__(self, tokens: jax.Array, *, train: bool = False) -> jax.Array:
    del train
    tokens = tokens.astype(jnp.int32)
    x = nn.Embed(self.vocab_size, self.width, name="embed")(tokens)
    z = Perceiver(num_latents=self.num_latents, latent_dim=self.latent_dim,
                  num_blocks=self.num_blocks, latent_layers=self.latent_layers,
                  num_heads=self.num_heads, num_bands=self.num_bands, name="perceiver")(
                      x, tokens != self.pad_id)
    return nn.Dense(self.num_classes, name="head")(nn.LayerNorm(name="norm")(z.mean(axis=1)))


def forward_flops(model: nn.Module, params: Any, batch_shape: tuple[int, ...]) -> float:
  """The compiled FLOP count of one forward on int32 inputs of `batch_shape` (XLA's estimate)."""
  x = jax.ShapeDtypeStruct(batch_shape, jnp.int32)
  cost = jax.jit(lambda p, t: model.apply({"params": p}, t)).lower(params, x).compile()
  cost = cost.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def train_classifier(model: nn.Module, task: Any, *, steps: int, batch_size: int = 32,
                     learning_rate: float = 1e-3, eval_examples: int = 1024,
                     seed: int = 0) -> dict[str, float]:
  """Adam (warmup-cosine) on `task.batch(step, batch_size)`; returns {"eval_accuracy",
  "seconds_per_step" (after compilation), "forward_gflops" (one example), "params"}."""
  sample = task.batch(0, batch_size)
  params = jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.asarray(sample["inputs"]))["params"]
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(steps // 20, 1), steps)
  tx = optax.adamw(schedule, weight_decay=1e-4)

  @jax.jit
  def step(p, o, inputs, targets):
    def loss_fn(p):
      logits = model.apply({"params": p}, inputs, train=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o, loss

  opt, start = tx.init(params), None
  for s in range(steps):
    b = task.batch(s, batch_size)
    params, opt, loss = step(params, opt, jnp.asarray(b["inputs"]), jnp.asarray(b["targets"]))
    if s == 0:
      jax.block_until_ready(loss)
      start = time.perf_counter()
  jax.block_until_ready(params)
  per_step = (time.perf_counter() - start) / max(steps - 1, 1)
  predict = jax.jit(lambda p, t: jnp.argmax(model.apply({"params": p}, t), -1))
  right = total = 0
  for i in range(max(eval_examples // batch_size, 1)):
    b = task.batch(i, batch_size, split="valid")
    right += int(np.sum(np.asarray(predict(params, jnp.asarray(b["inputs"]))) == b["targets"]))
    total += batch_size
  return {"eval_accuracy": right / total, "seconds_per_step": per_step,
          "forward_gflops": forward_flops(model, params, (1,) + sample["inputs"].shape[1:]) / 1e9,
          "params": float(sum(np.size(v) for v in jax.tree.leaves(params)))}
