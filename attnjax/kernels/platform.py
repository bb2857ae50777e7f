"""How a Pallas kernel runs on each platform, and its tile table.

`on_platform(call, *args)` lowers `call(*args, interpret=False)` for CUDA and `call(*args,
interpret=True)` for CPU, chosen by the platform the program is *lowered for* (`lax.platform_dependent`),
not by the default backend: the same jitted function runs the kernel in interpret mode on a CPU and
lowers to the Triton / Mosaic GPU kernel when lowered for CUDA, which is how the default suite checks
on a CPU-only machine that every kernel compiles for the GPU (`lower_for_cuda`).

Tile sizes come from `BLOCK_SIZES`, keyed by (kernel, device kind, head dim, dtype), with a default
per kernel; the table records the command that measured each row.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

__all__ = ["on_platform", "lower_for_cuda", "block_sizes", "BLOCK_SIZES", "DEFAULT_BLOCK_SIZES",
           "device_kind"]


def on_platform(call: Callable[..., Any], *args):
  """`call(*args, interpret=...)`: the compiled kernel where the program is lowered for CUDA or ROCm
  (both through Triton), Pallas' interpret mode where it is lowered for CPU."""
  compiled = functools.partial(call, interpret=False)
  return jax.lax.platform_dependent(*args, cpu=functools.partial(call, interpret=True),
                                    cuda=compiled, rocm=compiled)


def lower_for_cuda(fn: Callable[..., Any], *args, **kwargs) -> str:
  """The StableHLO text of `jax.jit(fn)(*args, **kwargs)` lowered for CUDA (works with a CPU-only
  jaxlib): a kernel that cannot be lowered for the GPU raises here."""
  return jax.jit(fn).trace(*args, **kwargs).lower(lowering_platforms=("cuda",)).as_text()


def device_kind() -> str:
  """The first device's kind, lower case ("nvidia h200", "cpu", ...)."""
  return jax.devices()[0].device_kind.lower()


# (kernel, device-kind substring, head dim, dtype name) -> tile settings. Measured rows name the
# command that measured them; anything not listed takes DEFAULT_BLOCK_SIZES[kernel].
BLOCK_SIZES: dict[tuple[str, str, int, str], dict[str, int]] = {}
DEFAULT_BLOCK_SIZES: dict[str, dict[str, int]] = {
    # decode_triton.py (split-K decode, contiguous and paged): keys per tile; the query tile is the
    # T·G rows of one kv head (>= 16), so a tile is small and a few warps suffice. Not yet measured.
    "decode_triton": dict(block_k=64, num_warps=4, num_stages=2),
    # flex_triton.py (flex attention forward and backward; tile = BlockMask block). Not yet measured.
    "flex_triton": dict(block_q=64, block_kv=64, num_warps=4, num_stages=2),
    # gla_triton.py (chunked gated linear attention, forward and backward): value columns per program
    # (the state tile is [F, block_v], carried across chunks in registers). Not yet measured.
    "gla_triton": dict(block_v=64, num_warps=4, num_stages=1),
    # flex_mosaic_gpu.py (Hopper forward): block_q = 64 · compute warpgroups, block_kv keys per
    # pipeline step, `stages` slots in the K/V ring. Not yet measured (FlashAttention-3's choices:
    # 2 x 64 query rows, 128 keys for H <= 128, fewer keys at H = 256 to fit shared memory).
    "flex_mosaic_gpu": dict(block_q=128, block_kv=128, stages=2),
}
BLOCK_SIZES.update({("flex_mosaic_gpu", "", 256, dt): dict(block_q=128, block_kv=64, stages=2)
                    for dt in ("bfloat16", "float16")})
# flex_triton on a CPU runs in interpret mode (head dim = the padded power of two): small tiles keep
# tests fast and still cover several tiles per sequence.
BLOCK_SIZES.update({("flex_triton", "cpu", d, dt): dict(block_q=16, block_kv=16, num_warps=4,
                                                        num_stages=1)
                    for d in (16, 32, 64, 128, 256) for dt in ("float32", "bfloat16", "float16")})
# gla_triton on a CPU runs in interpret mode: 16 value columns per program, so that a test's h + 1 > 16
# covers several value tiles (partial dq, dk summed across them).
BLOCK_SIZES.update({("gla_triton", "cpu", d, "float32"): dict(block_v=16, num_warps=4, num_stages=1)
                    for d in (16, 32, 64, 128, 256)})


def block_sizes(kernel: str, *, head_dim: int, dtype, kind: Optional[str] = None) -> dict[str, int]:
  """The tile settings of `kernel` for this device kind, head dim and dtype (the table row whose
  device-kind substring occurs in `kind`, else the kernel's default)."""
  kind = device_kind() if kind is None else kind.lower()
  name = jnp.dtype(dtype).name
  for (k, device, d, dt), sizes in BLOCK_SIZES.items():
    if k == kernel and device in kind and d == head_dim and dt == name:
      return dict(sizes)
  if kernel not in DEFAULT_BLOCK_SIZES:
    raise KeyError(f"no tile sizes for kernel {kernel!r}; known: {sorted(DEFAULT_BLOCK_SIZES)}")
  return dict(DEFAULT_BLOCK_SIZES[kernel])
