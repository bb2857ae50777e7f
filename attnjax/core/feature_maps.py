"""Feature maps φ for linear attention: `φ(q) · φ(k)` stands in for the softmax kernel `exp(q · k)`.

Every map works on the last axis of `[..., F]` arrays and returns float32 features. Maps with
randomness take the random matrix as an argument (no hidden PRNG state); maps whose constants come
from data statistics say so.

| name | φ(x) | paper |
| --- | --- | --- |
| identity | x | |
| elu_plus_one | elu(x) + 1 | Katharopoulos et al., arXiv:2006.16236 |
| relu | max(x, 0) | |
| l2_normalize | x / ‖x‖ (cosine similarity) | Cottention, arXiv:2409.18747 |
| softmax_features | softmax over the feature axis | Efficient Attention, arXiv:1812.01243 |
| lognormal | exp(α x) | Linear Log-Normal Attention, arXiv:2311.13541 |
| favor_plus | exp(W x - ‖x‖²/2) / √m | Performer, arXiv:2009.14794 |
| taylor2 | [1, x, vec(x xᵀ)/√2] | TaylorShift, arXiv:2403.02920; FAST, arXiv:2402.07901 |
| bounded_exp | exp(x - max x) | ReGLA, arXiv:2502.01578 |
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_F32 = jnp.float32


def identity(x):
  return x.astype(_F32)


def elu_plus_one(x):
  """`elu(x) + 1 > 0` (Katharopoulos et al., "Transformers are RNNs", arXiv:2006.16236)."""
  return jax.nn.elu(x.astype(_F32)) + 1.0


def relu(x):
  return jax.nn.relu(x.astype(_F32))


def l2_normalize(x, eps: float = 1e-6):
  """`x / max(‖x‖, eps)`: dot products of normalized rows are cosine similarities."""
  x = x.astype(_F32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def softmax_features(x):
  """Softmax over the feature axis (Efficient Attention's ρ_q)."""
  return jax.nn.softmax(x.astype(_F32), axis=-1)


def lognormal(x, alpha):
  """`exp(α x)` with α broadcast against x's leading axes (Linear Log-Normal Attention)."""
  return jnp.exp(jnp.asarray(alpha, _F32) * x.astype(_F32))


def bounded_exp(x):
  """`exp(x - max_f x_f)` ∈ (0, 1]: positive and bounded whatever the input scale (ReGLA)."""
  x = x.astype(_F32)
  return jnp.exp(x - jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True)))


def taylor2(x):
  """Second-order Taylor features `[1, x, vec(x xᵀ)/√2]` of width 1 + F + F².

  `taylor2(q) · taylor2(k) = 1 + q·k + (q·k)²/2`, the second-order Taylor expansion of `exp(q·k)`.
  """
  x = x.astype(_F32)
  outer = (x[..., :, None] * x[..., None, :]).reshape(x.shape[:-1] + (-1,)) * (0.5 ** 0.5)
  return jnp.concatenate([jnp.ones(x.shape[:-1] + (1,), _F32), x, outer], axis=-1)


def orthogonal_random_features(key, num_features: int, dim: int):
  """`[m, F]` Gaussian rows made orthogonal in blocks of F, with chi-distributed row norms.

  Each row is marginally N(0, I) (so the FAVOR+ estimate stays unbiased) while rows within a block
  are exactly orthogonal (lower variance). Performer, arXiv:2009.14794, section 2.4.
  """
  blocks = []
  keys = jax.random.split(key, -(-num_features // dim) + 1)
  for i in range(-(-num_features // dim)):
    g = jax.random.normal(keys[i], (dim, dim), _F32)
    qmat, _ = jnp.linalg.qr(g)
    blocks.append(qmat.T)
  w = jnp.concatenate(blocks, axis=0)[:num_features]
  norms = jnp.linalg.norm(jax.random.normal(keys[-1], (num_features, dim), _F32), axis=-1)
  return w * norms[:, None]


def favor_plus(x, projection, *, stabilizer=None):
  """Positive random features `exp(W x - ‖x‖²/2) / √m` with `W = projection [m, F]`.

  `E_W[φ(q) · φ(k)] = exp(q · k)` exactly (the softmax kernel, unbiased). `stabilizer` (broadcast
  against `[..., 1]`) is subtracted inside the exponent for range; a constant per query row, or one
  constant for all keys, cancels in normalized attention.
  """
  x = x.astype(_F32)
  w = jnp.asarray(projection, _F32)
  logits = jnp.einsum("...f,mf->...m", x, w) - 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)
  if stabilizer is not None:
    logits = logits - jax.lax.stop_gradient(stabilizer)
  return jnp.exp(logits) * (w.shape[0] ** -0.5)


FEATURE_MAPS = {
    "identity": identity,
    "elu_plus_one": elu_plus_one,
    "relu": relu,
    "l2_normalize": l2_normalize,
    "softmax_features": softmax_features,
    "bounded_exp": bounded_exp,
    "taylor2": taylor2,
}


def get(name: str):
  """A parameter-free feature map by name."""
  try:
    return FEATURE_MAPS[name]
  except KeyError:
    raise ValueError(f"unknown feature map {name!r}; choose from {sorted(FEATURE_MAPS)}") from None
