"""Dual cross-attention learning (DCAL): global-local cross-attention from the tokens attention
rollout ranks highest, and pair-wise cross-attention against a distractor image.

Zhu, Ke, Li, Liu, Tian, Shan, "Dual Cross-Attention Learning for Fine-Grained Visual Categorization
and Object Re-Identification", arXiv:2205.02151 (CVPR 2022).

  rollout   Ŝ_l = S̄_l S̄_{l-1} ··· S̄_1,  S̄ = 0.5 S + 0.5 I        (S the head-averaged map of a layer;
            the identity accounts for the residual path, as attention rollout, arXiv:2005.00928)
  GLCA      the R tokens with the largest rollout from the CLS token, r = Ŝ_l[CLS, :], query all
            keys:  f = softmax(Q_R Kᵀ / sqrt(d)) V                     [B, R, N, h]
  PWCA      (training only) the queries of image 1 attend over the keys and values of image 1 and a
            distractor image 2 together:  f = softmax(Q_1 [K_1; K_2]ᵀ / sqrt(d)) [V_1; V_2]
            so the distractor competes for attention mass and the model must find image 1's
            discriminative tokens; at inference it is dropped.

The paper's R is 10% of the tokens for classification (30% for re-identification); the CLS token
itself is a candidate like any other (the paper selects from all query vectors). GLCA and PWCA share
their weights with the self-attention of the same layer in the paper; here they are functions of
the q, k, v that layer computes, so the sharing is the caller's.

Shapes: `weights [L, B, N, T, T]` (post-softmax maps of L layers), `q [B, T, N, H]`, `k [B, S, K,
H]`, `v [B, S, K, h]` (GQA: K divides N).
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from attnjax import catalog
from attnjax.core import checks
from attnjax.typing import Array, Float, Int, Key, Output, Query, Value

__all__ = ["attention_rollout", "glca", "pwca", "top_tokens"]

LayerMaps = Float[Array, "L B N T T"]
Rollout = Float[Array, "B T T"]
TopIndices = Int[Array, "B R"]
SelectedOutput = Float[Array, "B R N h"]
_RESIDUAL = 0.5


def attention_rollout(weights: LayerMaps, *, residual: float = _RESIDUAL) -> Rollout:
  """Ŝ_L (module docstring) over the L layers of `weights [L, B, N, T, T]`, heads averaged; each
  row of the result sums to 1 when the maps' rows do."""
  if jnp.ndim(weights) != 5 or weights.shape[-1] != weights.shape[-2]:
    raise ValueError(f"attention_rollout: `weights` must be [L, B, N, T, T], got shape "
                     f"{jnp.shape(weights)}")
  t = weights.shape[-1]
  eye = jnp.eye(t, dtype=jnp.float32)
  layers = (1.0 - residual) * weights.astype(jnp.float32).mean(axis=2) + residual * eye

  def step(acc, layer):
    return layer @ acc, None

  out, _ = jax.lax.scan(step, jnp.broadcast_to(eye, layers.shape[1:]), layers)
  return out


def top_tokens(rollout: Rollout, count: int, *, cls_index: int = 0) -> TopIndices:
  """The `count` tokens with the largest rollout from the CLS token, `[B, R]`, largest first."""
  if not 1 <= count <= rollout.shape[-1]:
    raise ValueError(f"top_tokens: `count` must be in [1, T] = [1, {rollout.shape[-1]}], got "
                     f"{count}")
  return jax.lax.top_k(rollout[:, cls_index, :], count)[1]


def _attend(q, k, v, scale):
  n, kh = q.shape[2], k.shape[2]
  k = jnp.repeat(k.astype(jnp.float32), n // kh, axis=2)
  v = jnp.repeat(v.astype(jnp.float32), n // kh, axis=2)
  logits = jnp.einsum("btnh,bsnh->bnts", q.astype(jnp.float32), k) * scale
  return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, axis=-1), v)


@catalog.serves(207, kind="function", name="attnjax.cross.dual_cross.glca")
def glca(q: Query, k: Key, v: Value, rollout: Rollout, *, ratio: float = 0.1,
         count: Optional[int] = None, scale: Optional[float] = None
         ) -> tuple[SelectedOutput, TopIndices]:
  """Global-local cross-attention: the queries of the top-R rollout tokens (R = `count`, or
  ⌈ratio·T⌉) attend to every key. Returns `(out [B, R, N, h], indices [B, R])`."""
  op = "glca"
  B, T, S, _, _, H, _ = checks.check_qkv(op, q, k, v)
  if jnp.shape(rollout) != (B, T, T):
    raise ValueError(f"{op}: `rollout` must be [B, T, T] = [{B}, {T}, {T}], got shape "
                     f"{jnp.shape(rollout)}")
  r = count if count is not None else max(1, math.ceil(ratio * T))
  idx = top_tokens(rollout, r)
  chosen = jnp.take_along_axis(q, idx[:, :, None, None], axis=1)
  out = _attend(chosen, k, v, H ** -0.5 if scale is None else scale)
  return out.astype(q.dtype), idx


@catalog.serves(207, kind="function", name="attnjax.cross.dual_cross.pwca")
def pwca(q: Query, k: Key, v: Value, k_distractor: Key, v_distractor: Value, *,
         scale: Optional[float] = None) -> Output:
  """Pair-wise cross-attention: image 1's queries over the keys and values of both images
  (module docstring). `k_distractor`/`v_distractor`: `[B, S2, K, H]` / `[B, S2, K, h]`."""
  op = "pwca"
  _, _, _, _, _, H, _ = checks.check_qkv(op, q, k, v)
  checks.check_qkv(op, q, k_distractor, v_distractor)
  keys = jnp.concatenate([k, k_distractor], axis=1)
  values = jnp.concatenate([v, v_distractor], axis=1)
  return _attend(q, keys, values, H ** -0.5 if scale is None else scale).astype(q.dtype)
