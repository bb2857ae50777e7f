"""Rank against number of heads: one full-rank head against many low-rank heads on nearest neighbours.

Amsel, Yehudai & Bruna, "On the Benefits of Rank in Attention Layers", arXiv:2407.16153. Target
(their section 4, "Low-Rank Separation for Nearest Neighbors"): points x_1..x_n and a query y on the
unit sphere S^{d-1}; f(X, y) = x_{i*} with i* = argmax_i <x_i, y>. One head with a full-rank
W_QK = β I_d and W_V = I_d approximates f as β grows, for any n; heads whose W_QK = W_Q^h W_K^hᵀ has
rank r < d need a number of heads exponential in d. The experiment trains, at a fixed query-key
budget H·r = d (the usual H = d/r scaling),

  out(X, y) = Σ_h softmax_i( (y W_Q^h) · (x_i W_K^h) ) x_i W_V^h,   W_Q^h, W_K^h: [d, r], W_V^h: [d, d]

with Adam on fresh batches and reports the held-out mean squared error ||out - f||² per config.

  nearest_neighbour_batch(key, batch, n, d)      X [B, n, d], y [B, d], f [B, d]
  init_heads(key, d, heads, rank) / apply_heads(params, X, y)
  train_heads(heads, rank, *, n, d, steps, ...)   -> held-out MSE
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from attnjax import catalog

__all__ = ["apply_heads", "init_heads", "nearest_neighbour_batch", "train_heads"]


def _sphere(key, shape):
  x = jax.random.normal(key, shape)
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def nearest_neighbour_batch(key: jax.Array, batch: int, n: int, d: int):
  """`(X [B, n, d], y [B, d], f [B, d])`: uniform points on the sphere and the nearest neighbour of
  y among them (largest inner product)."""
  kx, ky = jax.random.split(key)
  X, y = _sphere(kx, (batch, n, d)), _sphere(ky, (batch, d))
  nearest = jnp.argmax(jnp.einsum("bnd,bd->bn", X, y), -1)
  return X, y, jnp.take_along_axis(X, nearest[:, None, None], axis=1)[:, 0]


def init_heads(key: jax.Array, d: int, heads: int, rank: int) -> dict:
  """W_Q, W_K `[H, d, r]` (scaled so the initial scores are O(1)) and W_V `[H, d, d]` (1/H I plus
  noise, so the heads start as a mean)."""
  if not 1 <= rank <= d or heads < 1:
    raise ValueError(f"init_heads: need 1 <= rank <= d = {d} and heads >= 1; got rank {rank}, "
                     f"heads {heads}")
  kq, kk, kv = jax.random.split(key, 3)
  scale = rank ** -0.25
  return {"q": scale * jax.random.normal(kq, (heads, d, rank)),
          "k": scale * jax.random.normal(kk, (heads, d, rank)),
          "v": jnp.eye(d) / heads + 0.01 * jax.random.normal(kv, (heads, d, d))}


def apply_heads(params: dict, X: jax.Array, y: jax.Array) -> jax.Array:
  """`[B, d]`: the sum over heads of softmax attention from y to the points (module docstring)."""
  q = jnp.einsum("bd,hdr->bhr", y, params["q"])
  k = jnp.einsum("bnd,hdr->bhnr", X, params["k"])
  w = jax.nn.softmax(jnp.einsum("bhr,bhnr->bhn", q, k), -1)
  return jnp.einsum("bhn,bnd,hde->be", w, X, params["v"])


@catalog.serves(201, kind="theory", name="attnjax.models.rank_heads.train_heads")
def train_heads(heads: int, rank: int, *, n: int = 8, d: int = 16, steps: int = 2000,
                batch: int = 256, learning_rate: float = 1e-2, seed: int = 0,
                eval_batch: int = 4096) -> float:
  """Held-out MSE of `heads` heads of query-key rank `rank`, trained with Adam for `steps` steps
  on fresh nearest-neighbour batches (`n` points in `d` dims)."""
  key = jax.random.PRNGKey(seed)
  params = init_heads(key, d, heads, rank)
  opt = optax.adam(learning_rate)

  def loss(params, key):
    X, y, f = nearest_neighbour_batch(key, batch, n, d)
    return jnp.mean(jnp.sum((apply_heads(params, X, y) - f) ** 2, -1))

  @jax.jit
  def run(params):
    def step(carry, key):
      params, state = carry
      updates, state = opt.update(jax.grad(loss)(params, key), state)
      return (optax.apply_updates(params, updates), state), None

    keys = jax.random.split(jax.random.fold_in(key, 1), steps)
    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), keys)
    X, y, f = nearest_neighbour_batch(jax.random.fold_in(key, 2), eval_batch, n, d)
    return jnp.mean(jnp.sum((apply_heads(params, X, y) - f) ** 2, -1))

  return float(run(params))
