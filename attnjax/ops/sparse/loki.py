"""Loki: rank keys by low-rank (PCA) scores, then attend exactly to the top-k of them.

Keys of a trained model lie near a low-dimensional subspace. Offline, a calibration batch of keys
gives each key head its PCA basis `P [H, H]` (columns: principal directions, by decreasing
explained variance; `loki_calibrate`). At inference, with `P_r = P[:, :r]`,

    s̃_ij = (q_i P_r) · (k_j P_r)                  approximate scores in r dimensions (ranking only)
    I_i  = top_k{ s̃_ij : j visible to i }
    o_i  = Σ_{j ∈ I_i} softmax_j(scale · q_i·k_j) v_j     exact attention over the chosen keys

As in the authors' code (`mask_attn_pca_topk` in `methods/pca_topk/utils.py` of
github.com/hpcgroup/loki), the projection is not mean-centred (the PCA means only define the
directions), the ranking uses the r-dimensional scores and the final weights the full-dimensional
ones over the chosen keys. With r = H (P orthogonal) s̃ equals the exact scores, and with k = S every
visible key is kept: exact attention.

`projection [K, H, H]` is a fixed buffer (`ParamSpec(trainable=False)`; the layer creates it as
identities, to be replaced by `loki_calibrate(keys)`); `rank` (r, default H / 4 as in the paper's
d_f = 0.25) and `top_k` are static settings. Query head n uses key head
n // (N/K)'s basis. Selection is per query token over visible keys by absolute position, so decoding
over a KV cache and packed documents equal the full forward. Reference implementation only: the
gather of `attnjax.core.sparse.gather_tokens` (O(T·k) memory after O(T·S·r) ranking).

Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]`, `projection [K,H,H]` → `[B,T,N,h]`.
Paper: Singhania et al., "Loki: Low-Rank Keys for Efficient Sparse Attention", arXiv:2406.02542.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.core import checks
from attnjax.core import contract
from attnjax.core import masks
from attnjax.core import sparse
from attnjax.registry import Mechanism, ParamSpec, example_params, register
from attnjax.typing import Array, Float, Key, Lengths, Output, Query, Value

__all__ = ["loki_attention", "loki_calibrate", "loki_scores"]

_HIGHEST = jax.lax.Precision.HIGHEST


def _identity_bases(key, shape, dtype=jnp.float32):
  """`[K, H, H]` identity matrices: rank by the first r coordinates until calibrated."""
  del key
  return jnp.broadcast_to(jnp.eye(shape[-2], shape[-1], dtype=dtype), shape)


# jaxtyping shapes of the basis and of a calibration batch (any leading dims).
Projection = Float[Array, "K H H"]
CalibrationKeys = Float[Array, "*L K H"]

PARAMS = (ParamSpec("projection", lambda N, K, H: (K, H, H), _identity_bases, trainable=False),)


def loki_calibrate(keys: CalibrationKeys, kv_lengths: Optional[Lengths] = None) -> Projection:
  """The PCA basis of each key head from a calibration batch: `keys [B, S, K, H]` (or any leading
  dims, all tokens used; `kv_lengths [B]` excludes padding of a `[B, S, K, H]` batch) →
  `[K, H, H]` float32, columns the eigenvectors of the centred key covariance by decreasing
  eigenvalue, each signed so its largest-magnitude entry is positive (a deterministic basis)."""
  x = jnp.asarray(keys, jnp.float32)
  if x.ndim < 3:
    raise ValueError(f"loki_calibrate: `keys` must have shape [..., K, H], got {x.shape}")
  K, H = x.shape[-2:]
  if kv_lengths is not None:
    checks.check_shape("loki_calibrate", "kv_lengths", kv_lengths, (x.shape[0],), "[B]")
    w = contract.valid_slots(x.shape[0], x.shape[1], kv_lengths).astype(jnp.float32)
  else:
    w = jnp.ones(x.shape[:-2], jnp.float32)
  x = x.reshape(-1, K, H)
  w = w.reshape(-1)[:, None, None]
  mean = jnp.sum(w * x, axis=0) / jnp.maximum(jnp.sum(w), 1.0)
  centred = (x - mean) * w
  cov = jnp.einsum("mkh,mkg->khg", centred, centred, precision=_HIGHEST)
  _, vectors = jnp.linalg.eigh(cov)                          # ascending eigenvalues
  vectors = vectors[..., ::-1]
  peak = jnp.take_along_axis(vectors, jnp.argmax(jnp.abs(vectors), axis=-2)[:, None], axis=-2)
  return vectors * jnp.where(peak < 0, -1.0, 1.0)


def loki_scores(q: Query, k: Key, projection, rank: int):
  """The approximate scores `(q P_r)·(k P_r)` float32 `[B, N, T, S]` (query head n with key head
  n // (N/K)'s basis)."""
  B, T, N, H = q.shape
  K = k.shape[2]
  p = projection.astype(jnp.float32)[..., :rank]                     # [K, H, r]
  qr = jnp.einsum("btkgh,khr->btkgr", q.astype(jnp.float32).reshape(B, T, K, N // K, H), p,
                  precision=_HIGHEST)
  kr = jnp.einsum("bskh,khr->bskr", k.astype(jnp.float32), p, precision=_HIGHEST)
  s = jnp.einsum("btkgr,bskr->bkgts", qr, kr, precision=_HIGHEST)
  return s.reshape(B, N, T, k.shape[1])


def loki_attention(q: Query, k: Key, v: Value, *, projection: Projection,
                   causal: bool = False, segment_ids=None, q_offset=0,
                   kv_lengths: Optional[Lengths] = None, scale: Optional[float] = None,
                   implementation: Optional[str] = None, rank: Optional[int] = None,
                   top_k: int = 64) -> Output:
  """Loki (see the module docstring): exact attention over each query's top-k keys by PCA scores."""
  op = "loki_attention"
  B, T, S, N, K, H, _ = checks.check_qkv(op, q, k, v)
  checks.check_implementation(op, implementation, ("reference",))
  checks.check_shape(op, "projection", projection, (K, H, H), "[K, H, H]")
  rank = max(1, H // 4) if rank is None else rank
  for name, value in (("rank", rank), ("top_k", top_k)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{op}: `{name}` must be a positive int, got {value!r}")
  if rank > H:
    raise ValueError(f"{op}: `rank` must be at most the head dim H = {H}, got {rank}")
  mask_mod = contract.contract_mask(B=B, T=T, S=S, causal=causal, q_offset=q_offset,
                                    segment_ids=segment_ids, kv_lengths=kv_lengths, op=op)
  visible = masks.evaluate_mask(mask_mod, B, N, T, S)
  indices, valid = sparse.token_top_k(loki_scores(q, k, projection, rank), top_k,
                                      visible=visible)
  return sparse.gather_tokens(q, k, v, indices, valid, scale=scale)


register(Mechanism(
    name="loki_attention", fn=loki_attention, family="sparse-inference", seeds=(227,),
    paper="Loki: Low-Rank Keys for Efficient Sparse Attention", arxiv="2406.02542",
    implementations=("reference",), params=PARAMS, complexity="O(T·S·r + T·top_k·H)",
    defaults=dict(rank=None, top_k=64),
    example=lambda *, N, K, H, h: {**example_params(PARAMS, N=N, K=K, H=H, perturb=0.5),
                                   "rank": 2, "top_k": 5}))
