"""The `cpu_flash` implementation of `flex_attention`: a fused C++ flash-attention kernel (forward and
FlashAttention-2 backward) called through `jax.ffi`, for the softmax normalizer without score_mod.

The kernel visits the tiles of the `BlockMask` (unioned over heads, as `xla` does) and applies no
mask on full tiles; the elementwise mask of the partial tiles is evaluated here in JAX, for just
those tiles (`[Bm, Nm, nq, P, block_q, block_kv]` booleans, P the most partial tiles of a query
block), so any `mask_mod` is served, traced captures included. Inputs are computed in float32 (bf16
and f16 are converted and the output cast back); the statistics and the `lse` contract are those of
`flex_attention` (-inf and zero output for a row with no visible key; the lse cotangent enters the
backward). Gradients are deterministic.

Not served (NotImplementedError, so automatic dispatch falls back to `xla`): a `score_mod`, another
normalizer, other dtypes, a non-CPU backend, a library that is not built (`python -m
attnjax.kernels.cpu.build`, run by `make test` / `demo` / `bench`), and a partial-tile mask over
`MAX_MASK_BYTES` (a traced block mask takes T·S bytes per batch row).

Paper: Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning",
arXiv:2307.08691; block sparsity as in FlexAttention (Dong et al., arXiv:2412.05496).
"""

from __future__ import annotations

import ctypes
import functools
import threading
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.core import block_mask as bm
from attnjax.core import implementations
from attnjax.core import normalizers

__all__ = ["DEFAULT_BLOCK", "MAX_MASK_BYTES", "available", "cpu_flash_attention", "tile_list_forward",
           "unavailable_reason"]

# Tiles of the block mask built when none is given: small tiles skip more of a causal mask; the
# kernel sub-tiles internally, so its speed barely depends on them.
DEFAULT_BLOCK = (128, 128)
# Largest partial-tile mask (bytes). A traced block mask (captured segment ids under jit) does not
# say how many partial tiles a query block has, so every tile gets a slot: T·S bytes per batch row
# (quadratic memory); beyond this size `xla` (linear memory) serves the call.
MAX_MASK_BYTES = 1 << 26
_FWD, _BWD = "attnjax_flash_fwd", "attnjax_flash_bwd"
_lock = threading.Lock()
_state: dict = {}


def unavailable_reason() -> Optional[str]:
  """Why the kernel library cannot be used here (None: it is loaded and its FFI targets registered)."""
  with _lock:
    if "reason" not in _state:
      _state["reason"] = _load()
    return _state["reason"]


def available() -> bool:
  """Whether `cpu_flash` can run (library built for this machine, source and jaxlib)."""
  return unavailable_reason() is None


def _load() -> Optional[str]:
  from attnjax.kernels.cpu import build as _build   # not at import: `python -m` runs it as __main__
  reason = _build.stale_reason()
  if reason is not None:
    return f"{reason} (run `python -m attnjax.kernels.cpu.build`)"
  try:
    lib = ctypes.CDLL(str(_build.LIBRARY))
    for name in (_FWD, _BWD):
      jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
  except (OSError, AttributeError) as e:
    return f"could not load {_build.LIBRARY.name}: {e}"
  _state["lib"] = lib
  return None


def cpu_flash_attention(q, k, v, *, score_mod, mask_mod, block_mask, normalizer, scale):
  """`flex_attention`'s `cpu_flash` form on checked inputs: `(out [B,T,N,h] in q's dtype, lse [B,T,N]
  float32)`; raises NotImplementedError for what it does not serve (module docstring)."""
  if score_mod is not None:
    raise NotImplementedError("cpu_flash: score_mod is not supported")
  if normalizer is not normalizers.SOFTMAX:
    raise NotImplementedError(f"cpu_flash: only the softmax normalizer (got {normalizer.name!r})")
  if q.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
    raise NotImplementedError(f"cpu_flash: dtype {q.dtype} is not supported")
  if implementations.current_platform() != "cpu":
    raise NotImplementedError("cpu_flash: runs on the CPU backend only")
  reason = unavailable_reason()
  if reason is not None:
    raise NotImplementedError(f"cpu_flash: {reason}")
  B, T, N, _ = q.shape
  S = k.shape[1]
  if block_mask is None:
    block_mask = bm.create_block_mask(mask_mod, B, N, T, S, block_q=min(DEFAULT_BLOCK[0], T),
                                      block_kv=min(DEFAULT_BLOCK[1], S))
  bq, bk = block_mask.block_size
  dtype = q.dtype
  if not isinstance(scale, (int, float, np.floating)):
    # A traced scale folds into q (in float32, so neither is rounded to q's dtype nor promotes the
    # output) so that autodiff reaches it; the kernel's scale stays static.
    q, scale = q.astype(jnp.float32) * jnp.asarray(scale, jnp.float32), 1.0
  pnum, pidx, fnum, fidx = _tile_lists(block_mask)
  mask = _partial_tile_mask(block_mask, pidx, B, N, S)
  if mask.size > MAX_MASK_BYTES:
    raise NotImplementedError(f"cpu_flash: the partial-tile mask would take {mask.size} bytes")
  f32 = lambda x: x.astype(jnp.float32)
  out, lse = _flash(float(scale), bq, bk, f32(q), f32(k), f32(v), (pnum, pidx, fnum, fidx), mask)
  return out.astype(dtype), lse


def tile_list_forward(q, k, v, lists, mask, *, scale: float, block_q: int, block_kv: int):
  """The kernel's forward over tile lists the caller builds (no `BlockMask`): `(out [B,T,N,h] float32,
  lse [B,T,N])` for float32 q [B,T,N,H], k [B,S,K,H], v [B,S,K,h]. `lists = (pnum [Bl,nq], pidx
  [Bl,nq,P], fnum [Bl,nq], fidx [Bl,nq,F])` int32 name each query block's partial and full key blocks
  (Bl in {1, B}); `mask [Bm,Nm,nq,P,block_q,block_kv]` bool the visible pairs of each partial one.
  Values of keys a partial tile hides from all its rows are read as zeros (they may be NaN). Not
  differentiable (no custom_vjp): callers define the backward. Raises NotImplementedError where the
  kernel cannot run (module docstring)."""
  if implementations.current_platform() != "cpu":
    raise NotImplementedError("cpu_flash: runs on the CPU backend only")
  reason = unavailable_reason()
  if reason is not None:
    raise NotImplementedError(f"cpu_flash: {reason}")
  if mask.size > MAX_MASK_BYTES:
    raise NotImplementedError(f"cpu_flash: the partial-tile mask would take {mask.size} bytes")
  return _forward(float(scale), int(block_q), int(block_kv), q, k, v, tuple(lists), mask)


def _tile_lists(block_mask: bm.BlockMask):
  """Per list row (`Bl` in {1, B}) and query block, the partial and full key blocks of the union over
  heads (a tile is visited when any head needs it, full only when full for all): `(pnum [Bl,nq],
  pidx [Bl,nq,P], fnum [Bl,nq], fidx [Bl,nq,F])`, numpy when the block mask is static, with P and F
  the largest counts (at least 1); traced lists keep every slot."""
  classes = block_mask.classes()
  xp = np if block_mask.is_static else jnp
  visit = xp.any(classes != bm.EMPTY, axis=1)
  full = xp.all(classes == bm.FULL, axis=1)
  merged = xp.where(full, bm.FULL, xp.where(visit, bm.PARTIAL, bm.EMPTY)).astype(xp.int32)

  def lists(kind):
    hit = merged == kind
    order = xp.argsort(xp.logical_not(hit), axis=-1, stable=True).astype(xp.int32)
    num = hit.sum(-1).astype(xp.int32)
    if xp is np:
      order = order[..., :max(1, int(num.max(initial=0)))]
    return num, order

  return (*lists(bm.PARTIAL), *lists(bm.FULL))


def _partial_tile_mask(block_mask: bm.BlockMask, pidx, B: int, N: int, S: int):
  """`[Bm, Nm, nq, P, bq, bk]` bool: the visible pairs of each listed partial tile (Bm in {1, B}, Nm
  in {1, N}: whatever the mask varies over), keys at or past S hidden."""
  bq, bk = block_mask.block_size
  nq = pidx.shape[1]
  Bm, Nm = block_mask.kv_num_blocks.shape[:2]
  idx = lambda x, shape: jnp.asarray(x, jnp.int32).reshape(shape)
  b = idx(np.arange(B), (B, 1, 1, 1, 1, 1))
  n = idx(np.arange(N), (1, N, 1, 1, 1, 1))
  qi = idx(np.arange(nq)[:, None] * bq + np.arange(bq), (1, 1, nq, 1, bq, 1))
  ki = (jnp.asarray(pidx, jnp.int32) * bk)[:, None, :, :, None, None] + idx(np.arange(bk),
                                                                            (1, 1, 1, 1, 1, bk))
  if Bm == 1 and Nm == 1:
    # Tiles shared by every row and head: the union's partial tiles are the block mask's own.
    mod = block_mask.mask_mod
  else:
    mod = block_mask.as_mask_mod()
  keep = ki < S
  if mod is not None:
    keep = jnp.logical_and(keep, mod(b, n, qi, ki))
  shape = keep.shape
  Bk = B if shape[0] > 1 else 1
  Nk = N if shape[1] > 1 else 1
  return jnp.broadcast_to(keep, (Bk, Nk, nq, pidx.shape[2], bq, bk))


def _call(name, outs, *args, scale, bq, bk):
  return jax.ffi.ffi_call(name, outs, vmap_method="sequential")(
      *args, scale=np.float32(scale), block_q=np.int64(bq), block_kv=np.int64(bk))


def _forward(scale, bq, bk, q, k, v, lists, mask):
  B, T, N, _ = q.shape
  outs = (jax.ShapeDtypeStruct((B, T, N, v.shape[-1]), jnp.float32),
          jax.ShapeDtypeStruct((B, T, N), jnp.float32))
  return _call(_FWD, outs, q, k, v, *lists, mask, scale=scale, bq=bq, bk=bk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _flash(scale, bq, bk, q, k, v, lists, mask):
  return _forward(scale, bq, bk, q, k, v, lists, mask)


def _flash_fwd(scale, bq, bk, q, k, v, lists, mask):
  out, lse = _forward(scale, bq, bk, q, k, v, lists, mask)
  return (out, lse), (q, k, v, lists, mask, out, lse)


def _flash_bwd(scale, bq, bk, residuals, cotangents):
  q, k, v, lists, mask, out, lse = residuals
  dout, dlse = cotangents
  outs = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
  dq, dk, dv = _call(_BWD, outs, q, k, v, out, lse, dout.astype(jnp.float32),
                     dlse.astype(jnp.float32), *lists, mask, scale=scale, bq=bq, bk=bk)
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
