"""Memorization capacity of one multi-head attention layer as the number of heads grows.

Mahdavi, Liao & Thrampoulidis, "Memorization Capacity of Multi-Head Attention in Transformers",
arXiv:2306.02010: a layer of H heads memorizes Ω(H n) examples of n tokens when n < d. The probe:
N sequences X ∈ R^{n×d} (Gaussian) with random ±1 labels, read out at the first token,

  out(X) = Σ_h softmax( (x_1 W_Q^h) (X W_K^h)ᵀ ) X W_V^h u_h,   W_Q^h, W_K^h, W_V^h: [d, d_h], u_h: [d_h]

(a scalar; the sign is the prediction), trained full batch with Adam on the logistic loss. The
capacity at H is the largest N of a grid whose labels are all fitted. Every N of the grid is trained
in one program: the examples past N are masked out of the loss.

  attention_readout(params, X)                  [N]
  fit_accuracy(heads, examples, ...)            training accuracy on the first `examples` sequences
  capacity(heads, grid, ...)                    the largest N of `grid` fitted to 100%
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import optax

from attnjax import catalog

__all__ = ["attention_readout", "capacity", "fit_accuracy", "init_readout"]


def init_readout(key: jax.Array, d: int, heads: int, head_dim: int) -> dict:
  """Per-head W_Q, W_K, W_V `[H, d, d_h]` and readouts u `[H, d_h]`."""
  kq, kk, kv, ku = jax.random.split(key, 4)
  n = lambda k, shape, fan: jax.random.normal(k, shape) / jnp.sqrt(fan)
  return {"q": n(kq, (heads, d, head_dim), d), "k": n(kk, (heads, d, head_dim), d),
          "v": n(kv, (heads, d, head_dim), d), "u": n(ku, (heads, head_dim), head_dim)}


def attention_readout(params: dict, X: jax.Array) -> jax.Array:
  """`[N]`: the heads' attention from the first token, summed through their readouts."""
  q = jnp.einsum("nd,hde->nhe", X[:, 0], params["q"])
  k = jnp.einsum("ntd,hde->nhte", X, params["k"])
  w = jax.nn.softmax(jnp.einsum("nhe,nhte->nht", q, k) / jnp.sqrt(q.shape[-1]), -1)
  values = jnp.einsum("ntd,hde->nhte", X, params["v"])
  return jnp.einsum("nht,nhte,he->n", w, values, params["u"])


def _data(seed, examples, n, d):
  kx, ky = jax.random.split(jax.random.PRNGKey(seed))
  X = jax.random.normal(kx, (examples, n, d))
  return X, jnp.where(jax.random.bernoulli(ky, 0.5, (examples,)), 1.0, -1.0)


def _fit(heads, head_dim, n, d, max_examples, steps, learning_rate, seed):
  """A jitted `used [N] -> accuracy on the used examples` (one compile per architecture)."""
  X, y = _data(seed, max_examples, n, d)
  params = init_readout(jax.random.PRNGKey(seed + 1), d, heads, head_dim)
  opt = optax.adam(learning_rate)

  @jax.jit
  def run(used):
    def loss(params):
      margins = y * attention_readout(params, X)
      return jnp.sum(used * jax.nn.softplus(-margins)) / jnp.sum(used)

    def step(carry, _):
      params, state = carry
      updates, state = opt.update(jax.grad(loss)(params), state)
      return (optax.apply_updates(params, updates), state), None

    (trained, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
    correct = (y * attention_readout(trained, X)) > 0
    return jnp.sum(used * correct) / jnp.sum(used)

  return run


def fit_accuracy(heads: int, examples: int, *, n: int = 8, d: int = 16, head_dim: int = 4,
                 steps: int = 1500, learning_rate: float = 1e-2, seed: int = 0) -> float:
  """Training accuracy after fitting the first `examples` random sequences' labels."""
  run = _fit(heads, head_dim, n, d, examples, steps, learning_rate, seed)
  return float(run(jnp.ones((examples,))))


@catalog.serves(237, kind="theory", name="attnjax.models.memorization.capacity")
def capacity(heads: int, grid: Sequence[int], *, n: int = 8, d: int = 16, head_dim: int = 4,
             steps: int = 1500, learning_rate: float = 1e-2, seed: int = 0) -> int:
  """The largest N of `grid` whose random labels H heads fit to 100% training accuracy (0 if none).
  The grid shares one compiled program (the examples past N are masked out)."""
  grid = sorted(int(g) for g in grid)
  if not grid or grid[0] < 1:
    raise ValueError(f"capacity: grid must hold positive example counts, got {grid}")
  run = _fit(heads, head_dim, n, d, grid[-1], steps, learning_rate, seed)
  best = 0
  for examples in grid:
    used = (jnp.arange(grid[-1]) < examples).astype(jnp.float32)
    if float(run(used)) == 1.0:
      best = examples
  return best
