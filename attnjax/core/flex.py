"""Flex attention: softmax-family attention with user score/mask modifications and block sparsity.

    s_ij = score_mod(scale · q_i·k_j, b, n, i, j)       visible(i, j) = mask_mod(b, n, i, j)
    o_i  = Σ_{j visible} f(s_ij) v_j / (Σ_{j visible} h(s_ij) + ε)       (normalizer (f, h, ε))

Shapes: `q: [B,T,N,H]`, `k: [B,S,K,H]`, `v: [B,S,K,h]` → `[B,T,N,h]` (GQA when K divides N: query
head n reads key/value head n // (N/K)); residual `lse: [B,T,N]` float32, the log of the denominator
(-inf on a row with no visible key, whose output is zeros).

Implementations:
  reference  dense, float32, materializes the `[T, S]` scores (and can return them: `attention_weights`).
  xla        chunked online normalization over key blocks, visiting only the non-empty tiles of the
             `BlockMask` and skipping the elementwise mask on full tiles; a custom VJP recomputes the
             scores tile by tile instead of storing them, so memory is linear in sequence length
             (`flex_xla.py`).
  pallas_triton  the same algorithm as Pallas kernels lowered through Triton (forward; dq and dk/dv
             backward), listed for GPUs only; named on a CPU it runs in Pallas' interpret mode
             (`kernels/flex_triton.py`). Mods it cannot compile, and q, k, v of different dtypes,
             raise NotImplementedError, so automatic dispatch falls back to `xla`.
  pallas_mosaic_gpu  FlashAttention-3-style forward for Hopper GPUs through Pallas' Mosaic GPU (TMA
             pipeline, wgmma; `kernels/flex_mosaic_gpu.py`), backward by the pallas_triton kernels:
             softmax, bf16/fp16, head dims 64/128/256, static block masks, index-arithmetic mask_mods,
             no score_mod; NotImplementedError otherwise and off Hopper (no CPU interpret mode).
  cpu_flash  a fused C++ FlashAttention-2 forward and backward behind `jax.ffi` (`kernels/cpu/`,
             built by `make` / `python -m attnjax.kernels.cpu.build`), the CPU default: softmax, any
             mask (evaluated in JAX on the partial tiles only), no score_mod; NotImplementedError (so
             `xla` serves) otherwise, or when the library is not built (it needs a C++ compiler and an
             x86-64 CPU with AVX: elsewhere the build fails and `xla` serves).

Paper: Dong et al., "Flex Attention: A Programming Model for Generating Optimized Attention Kernels",
arXiv:2412.05496; the tiling is FlashAttention-2 (Dao, arXiv:2307.08691).
"""

from __future__ import annotations

from typing import Optional, Union

import jax
import jax.numpy as jnp

from attnjax.core import block_mask as bm
from attnjax.core import checks
from attnjax.core import flex_xla
from attnjax.core import implementations
from attnjax.core.normalizers import Normalizer, get_normalizer
from attnjax.kernels import cpu as cpu_kernels
from attnjax.kernels import flex_mosaic_gpu, flex_triton
from attnjax.typing import Key, LogSumExp, MaskMod, Output, Query, ScoreMod, Value

# ----------------------------------------------------------------------------------------------------
# Public entry


def flex_attention(q: Query, k: Key, v: Value, *, score_mod: Optional[ScoreMod] = None,
                   mask_mod: Optional[MaskMod] = None, block_mask: Optional[bm.BlockMask] = None,
                   normalizer: Union[str, Normalizer] = "softmax", scale=None,
                   return_residuals: bool = False, implementation: Optional[str] = None
                   ) -> Union[Output, tuple[Output, LogSumExp]]:
  """Attention with `score_mod`, `mask_mod`, a block-sparse `block_mask` and a streamable normalizer.

  Args:
    q: `[B, T, N, H]` queries. k: `[B, S, K, H]` keys. v: `[B, S, K, h]` values; K divides N.
    score_mod: `score_mod(score, b, n, q_idx, kv_idx) -> score` on the scaled logits.
    mask_mod: `mask_mod(b, n, q_idx, kv_idx) -> bool`, True keeps the pair.
    block_mask: precomputed tile classification (`create_block_mask`). Built from `mask_mod` when
      absent. With both, the visible pairs are the intersection: those `block_mask` makes visible
      (`block_mask.to_dense()`) AND `mask_mod` (a `mask_mod` that is the block mask's own adds
      nothing); every implementation computes exactly that set.
    normalizer: "softmax" or another registered `Normalizer` (see `normalizers`).
    scale: multiplies q·k; defaults to `H ** -0.5`.
    return_residuals: also return `lse: [B, T, N]` (float32).
    implementation: "cpu_flash", "pallas_triton", "pallas_mosaic_gpu", "xla", "reference", or None
      for the first that serves the input on this platform (module docstring).

  Returns:
    `[B, T, N, h]` in q's dtype, and `lse` when `return_residuals`.
  """
  B, T, S, N, K, H, h = checks.check_qkv("flex_attention", q, k, v)
  normalizer = get_normalizer(normalizer)
  if block_mask is not None:
    if tuple(block_mask.seq_lengths) != (T, S):
      raise ValueError(f"flex_attention: `block_mask` was built for (T, S) = {block_mask.seq_lengths},"
                       f" but q and k give ({T}, {S})")
    bmb, bmn = block_mask.kv_num_blocks.shape[:2]
    if bmb not in (1, B) or bmn not in (1, N):
      raise ValueError(f"flex_attention: `block_mask` has batch/heads ({bmb}, {bmn}); expected each "
                       f"to be 1 or ({B}, {N})")
    for name, axis, built, size, varies in (("B", "batch row", bmb, B, block_mask.varies[0]),
                                            ("N", "head", bmn, N, block_mask.varies[1])):
      if varies and built != size:
        raise ValueError(
            f"flex_attention: `block_mask` was built with {name}={built} from a mask_mod that "
            f"depends on the {axis}, but q gives {name}={size}; rebuild it with "
            f"create_block_mask(mask_mod, ..., {name}={size}, ...)")
    if mask_mod is not None and mask_mod is not block_mask.mask_mod:
      # Both given: the visible set is their intersection (see Args), which the block mask encodes.
      block_mask = block_mask.restrict(mask_mod)
    mask_mod = block_mask.mask_mod
  if scale is None:
    scale = H ** -0.5
  implementation = _forward_mode_implementation(implementation, q, k, v)
  out, lse = implementations.dispatch(
      "flex_attention", _IMPLEMENTATIONS, implementation, q, k, v, score_mod=score_mod,
      mask_mod=mask_mod, block_mask=block_mask, normalizer=normalizer, scale=scale)
  return (out, lse) if return_residuals else out


def _forward_mode_implementation(implementation, *arrays):
  """The implementation to use when `arrays` may be under forward-mode autodiff (`jax.jvp`,
  `jax.jacfwd`): the tiled implementations define a custom VJP (reverse mode only), so automatic
  dispatch takes the dense `reference` there, and a named tiled one is a clear error."""
  if not implementations.under_forward_mode(*arrays):
    return implementation
  if implementation in (None, "reference"):
    return "reference"
  raise ValueError(
      f"flex_attention: implementation={implementation!r} differentiates in reverse mode only (a "
      "custom VJP); for forward-mode autodiff (jax.jvp, jax.jacfwd) use implementation='reference' "
      "or None, which picks it")


def attention_weights(q, k, *, score_mod=None, mask_mod=None, normalizer="softmax", scale=None):
  """Dense attention weights and logits `[B, N, T, S]` (float32), for analysis.

  `logits` are the modified scores (masked pairs at -inf); each weight row sums to 1 for a normalized
  normalizer with ε = 0, or to 0 when the row sees no key.
  """
  v = jnp.zeros(k.shape[:3] + (1,), q.dtype)
  _, _, weights, logits = _dense(q, k, v, score_mod=score_mod, mask_mod=mask_mod,
                                 normalizer=get_normalizer(normalizer),
                                 scale=q.shape[-1] ** -0.5 if scale is None else scale)
  B, T, N, _ = q.shape
  S = k.shape[1]
  return weights.reshape(B, N, T, S), logits.reshape(B, N, T, S)


# ----------------------------------------------------------------------------------------------------
# reference


def _dense(q, k, v, *, score_mod, mask_mod, normalizer: Normalizer, scale):
  """(out [B,T,N,h], lse [B,T,N], weights [B,K,G,T,S], logits [B,K,G,T,S]) in float32."""
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  G = N // K
  qf = q.astype(jnp.float32).reshape(B, T, K, G, H)
  s = jnp.einsum("btkgh,bskh->bkgts", qf, k.astype(jnp.float32)) * scale
  b = jnp.arange(B, dtype=jnp.int32)[:, None, None, None, None]
  n = flex_xla.head_index(K, G)
  qi = jnp.arange(T, dtype=jnp.int32)[None, None, None, :, None]
  ki = jnp.arange(S, dtype=jnp.int32)[None, None, None, None, :]
  if score_mod is not None:
    s = score_mod(s, b, n, qi, ki).astype(jnp.float32)
  visible = jnp.ones(s.shape, bool)
  if mask_mod is not None:
    visible = jnp.broadcast_to(mask_mod(b, n, qi, ki), s.shape)
  logits = jnp.where(visible, s, -jnp.inf)
  # The shift only keeps exp in range; the weights do not depend on it, so no gradient flows to it.
  m = jax.lax.stop_gradient(normalizer.shift(jnp.max(logits, axis=-1, keepdims=True)))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  w, mass = normalizer.weight_and_mass(s, m)
  w = jnp.where(visible, w, 0.0)
  if normalizer.normalized:
    den = normalizer.denominator(jnp.sum(jnp.where(visible, mass, 0.0), -1, keepdims=True), m)
    # A row with no visible key is empty even when ε makes its denominator positive (softpick):
    # the contract gives it lse = -inf.
    empty = (den == 0) | jnp.logical_not(jnp.any(visible, axis=-1, keepdims=True))
    w = w / jnp.where(empty, 1.0, den)
    lse = jnp.where(empty, -jnp.inf, m + jnp.log(jnp.where(empty, 1.0, den)))[..., 0]
  else:
    lse = jnp.zeros(s.shape[:-1], jnp.float32)
  out = jnp.einsum("bkgts,bskh->btkgh", w, v.astype(jnp.float32)).reshape(B, T, N, -1)
  lse = jnp.moveaxis(lse.reshape(B, N, T), 1, 2)
  return out, lse, w, logits


def _reference(q, k, v, *, score_mod, mask_mod, block_mask, normalizer, scale):
  if block_mask is not None:
    # Exactly the pairs the block mask makes visible (full tiles, and partial tiles where its
    # mask_mod holds; `flex_attention` has made `mask_mod` the block mask's own).
    mask_mod = block_mask.as_mask_mod()

  out, lse, _, _ = _dense(q, k, v, score_mod=score_mod, mask_mod=mask_mod, normalizer=normalizer,
                          scale=scale)
  return out.astype(q.dtype), lse


# The `xla` path's tile sizes live with it; re-exported so `flex.DEFAULT_BLOCK` stays the one table.
DEFAULT_BLOCK = flex_xla.DEFAULT_BLOCK
default_block_size = flex_xla.default_block_size


_IMPLEMENTATIONS = (
    ("cpu_flash", cpu_kernels.cpu_flash_attention, ("cpu",)),
    ("pallas_triton", flex_triton.flex_triton_attention, ("gpu",)),
    ("pallas_mosaic_gpu", flex_mosaic_gpu.flex_mosaic_gpu_attention, ("gpu",)),
    ("xla", flex_xla.xla_flex_attention, ()),
    ("reference", _reference, ()),
)
