"""A short Adam loop for tests that check a model learns (its loss falls), shared by model tests."""

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax


def train(apply_fn: Callable[[Any, jax.Array], jax.Array], params: Any,
          batch_fn: Callable[[int], Mapping[str, Any]], steps: int, *,
          learning_rate: float = 1e-2) -> tuple[Any, list[float]]:
  """`(params, per-step losses)` after `steps` Adam steps on `batch_fn(step)` batches
  ({"inputs", "targets"} and optional "weights"), minimizing the (weighted) mean cross-entropy of
  `apply_fn(params, inputs)`'s logits; one compiled step."""
  tx = optax.adam(learning_rate)

  def loss_fn(p, batch):
    nll = optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, batch["inputs"]),
                                                          batch["targets"])
    if "weights" not in batch:
      return nll.mean()
    return (nll * batch["weights"]).sum() / batch["weights"].sum()

  @jax.jit
  def step(p, o, batch):
    loss, grads = jax.value_and_grad(loss_fn)(p, batch)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o, loss

  opt_state, losses = tx.init(params), []
  for s in range(steps):
    params, opt_state, loss = step(params, opt_state,
                                   {k: jnp.asarray(v) for k, v in batch_fn(s).items()})
    losses.append(float(loss))
  return params, losses
