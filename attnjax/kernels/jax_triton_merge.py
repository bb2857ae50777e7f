"""`merge_attention_states(..., implementation="jax_triton")`: the log-sum-exp merge of m partial
attention states as a Triton kernel (`kernels/triton_merge_kernel.py`) called through
`jax_triton.triton_call`.

    lse = log Σ_i exp(lse_i),      o = Σ_i exp(lse_i - lse) · o_i

Shapes: `outs [m, ..., h]`, `lses [m, ...]` → `(out [..., h] in outs' dtype, lse [...] float32)`; the
leading axes are flattened to R rows and one program merges a tile of rows (every o_i read once, the
statistics in float32). A part with lse_i = -inf contributes nothing; all parts empty gives zeros and
lse = -inf.

Gradients: a custom VJP whose backward pass is the VJP of the XLA merge it is given (the merge is a
cheap elementwise reduction: recomputing it in XLA costs one more read of the inputs). Under `vmap`
the batch axis is folded into the rows (`jax.custom_batching.custom_vmap`), since jax-triton's call
has no batching rule.

Availability: `triton` and `jax_triton` (the `gpu` extra) are imported when the implementation is
called; without them, or on a platform other than a CUDA GPU, it raises `NotImplementedError`, so
automatic dispatch falls back to `xla`. There is no interpret mode through JAX: the kernel's source is
checked on a CPU by Triton's own interpreter (`TRITON_INTERPRET=1`, tests/kernels/jax_triton_test.py).

Paper: Ye et al., "FlashInfer: Efficient and Customizable Attention Engine for LLM Inference
Serving", arXiv:2501.01005.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable

import jax
import jax.numpy as jnp

__all__ = ["merge", "kernel_call", "tile_sizes", "IMPLEMENTATION"]

IMPLEMENTATION = "jax_triton"
_OP = "merge_attention_states"
# Elements of a [BLOCK_R, BLOCK_D] float32 accumulator per program (8 KiB of registers at 4 warps).
_TILE_ELEMENTS = 2048


def _pow2(n: int) -> int:
  return 1 << (max(n, 1) - 1).bit_length()


def tile_sizes(R: int, D: int) -> tuple[int, int]:
  """`(BLOCK_R, BLOCK_D)`: the head dim padded to a power of two (>= 16), rows to fill the tile."""
  block_d = max(16, _pow2(D))
  block_r = max(1, min(_pow2(R), _TILE_ELEMENTS // block_d))
  return block_r, block_d


def _modules():
  """(jax_triton, the kernel module), or NotImplementedError naming what is missing."""
  try:
    import jax_triton  # pylint: disable=g-import-not-at-top
    from attnjax.kernels import triton_merge_kernel  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise NotImplementedError(
        f"{_OP}: implementation {IMPLEMENTATION!r} needs the `triton` and `jax_triton` packages "
        f"(pip install 'attnjax[gpu]'); {e}") from e
  return jax_triton, triton_merge_kernel


def check_available() -> None:
  """Raises `NotImplementedError` unless jax-triton is importable and the default backend is a GPU."""
  _modules()
  if jax.default_backend() != "gpu":
    raise NotImplementedError(
        f"{_OP}: implementation {IMPLEMENTATION!r} runs on a CUDA GPU only (default backend: "
        f"{jax.default_backend()}); use implementation='xla'")


def kernel_call(outs: jax.Array, lses: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The raw kernel call on stacked `outs [m, ..., h]`, `lses [m, ...]` (no autodiff, no vmap)."""
  jt, source = _modules()
  m, *lead, D = outs.shape
  R = 1
  for n in lead:
    R *= n
  o = outs.reshape(m, R, D)
  lse = lses.astype(jnp.float32).reshape(m, R)
  block_r, block_d = tile_sizes(R, D)
  shapes = [jax.ShapeDtypeStruct((R, D), outs.dtype), jax.ShapeDtypeStruct((R,), jnp.float32)]
  # jax-triton <= 0.3 names the outputs `out_shape`, later versions `out_type`.
  out_kw = "out_shape" if "out_shape" in inspect.signature(jt.triton_call).parameters else "out_type"
  out, lse_out = jt.triton_call(
      o, lse, kernel=source.merge_kernel, grid=(-(-R // block_r),), name="attnjax_merge_states",
      num_warps=4, num_stages=1, M=m, R=R, D=D, BLOCK_R=block_r, BLOCK_D=block_d,
      **{out_kw: shapes})
  return out.reshape(*lead, D), lse_out.reshape(lead)


@functools.cache
def _differentiable(call: Callable, xla_merge: Callable) -> Callable:
  """`call` (stacked outs, lses -> out, lse) with `xla_merge`'s VJP and a batching rule that folds
  vmapped axes into the rows."""

  @jax.custom_batching.custom_vmap
  def forward(outs, lses):
    return call(outs, lses)

  @forward.def_vmap
  def _batched(axis_size, in_batched, outs, lses):   # the batch axis is leading: move it after m
    outs_b, lses_b = in_batched
    outs = jnp.moveaxis(outs, 0, 1) if outs_b else jnp.broadcast_to(
        outs[:, None], (outs.shape[0], axis_size, *outs.shape[1:]))
    lses = jnp.moveaxis(lses, 0, 1) if lses_b else jnp.broadcast_to(
        lses[:, None], (lses.shape[0], axis_size, *lses.shape[1:]))
    return forward(outs, lses), (True, True)

  @jax.custom_vjp
  def merge_fn(outs, lses):
    return forward(outs, lses)

  def fwd(outs, lses):
    return forward(outs, lses), (outs, lses)

  def bwd(residuals, cotangents):
    _, vjp = jax.vjp(xla_merge, *residuals)
    return vjp(cotangents)

  merge_fn.defvjp(fwd, bwd)
  return merge_fn


def merge(outs: jax.Array, lses: jax.Array, *, xla_merge: Callable,
          call: Callable = kernel_call) -> tuple[jax.Array, jax.Array]:
  """The jax_triton row of `merge_attention_states` on stacked `outs [m, ..., h]`, `lses [m, ...]`.

  Args:
    outs, lses: the stacked partial states (checked by the caller).
    xla_merge: the XLA merge on the same arguments; its VJP is this implementation's backward pass.
    call: the forward computation (default: the Triton kernel; tests substitute a CPU function to
      check the autodiff and batching wrappers).

  Raises:
    NotImplementedError: jax-triton / triton are not installed, or the backend is not a GPU (only
      when `call` is the kernel).
  """
  if call is kernel_call:
    check_available()
  return _differentiable(call, xla_merge)(outs, lses)
