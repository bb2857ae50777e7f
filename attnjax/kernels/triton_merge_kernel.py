"""The Triton source of the log-sum-exp merge of m partial attention states (see
`attnjax.kernels.jax_triton_merge`, which calls it from JAX through `jax_triton.triton_call`).

    lse = log Σ_i exp(lse_i),      o = Σ_i exp(lse_i - lse) · o_i          (i = 1..M)

over rows r of `o [M, R, D]` and `lse [M, R]` (float32); a part with lse_i = -inf contributes nothing,
a row whose parts are all empty gives zeros and lse = -inf. One program merges `BLOCK_R` rows: a
first pass over the M parts takes the row maximum of lse_i, a second accumulates the weights
exp(lse_i - max) and the weighted outputs in float32 (every o_i is read once).

This module imports `triton` at the top: import it only where Triton is installed (the `gpu` extra).
Paper: Ye et al., "FlashInfer: Efficient and Customizable Attention Engine for LLM Inference
Serving", arXiv:2501.01005 (the merge operator of attention states).
"""

import triton
import triton.language as tl

__all__ = ["merge_kernel"]


@triton.jit
def merge_kernel(o_ptr, lse_ptr, out_ptr, lse_out_ptr, M: tl.constexpr, R: tl.constexpr,
                 D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
  """Program p merges rows [p·BLOCK_R, (p+1)·BLOCK_R) of `o_ptr [M, R, D]`, `lse_ptr [M, R]` into
  `out_ptr [R, D]` (its own dtype) and `lse_out_ptr [R]` (float32). Pointers are contiguous."""
  pid = tl.program_id(0)
  rows = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)     # int64: M·R·D may pass 2^31
  cols = tl.arange(0, BLOCK_D)
  row_ok = rows < R
  tile_ok = row_ok[:, None] & (cols[None, :] < D)
  tile = rows[:, None] * D + cols[None, :]

  m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
  for i in range(M):
    lse_i = tl.load(lse_ptr + i * R + rows, mask=row_ok, other=float("-inf"))
    m = tl.maximum(m, lse_i)
  # An all-empty row keeps m = -inf: shifting by 0 gives exp(-inf) = 0, not exp(-inf + inf) = NaN.
  m_safe = tl.where(m == float("-inf"), 0.0, m)

  total = tl.zeros((BLOCK_R,), tl.float32)
  acc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
  for i in range(M):
    lse_i = tl.load(lse_ptr + i * R + rows, mask=row_ok, other=float("-inf"))
    w = tl.exp(lse_i - m_safe)
    o_i = tl.load(o_ptr + i * R * D + tile, mask=tile_ok, other=0.0).to(tl.float32)
    total += w
    acc += w[:, None] * o_i

  empty = total == 0.0
  denom = tl.where(empty, 1.0, total)
  out = acc / denom[:, None]
  lse = tl.where(empty, float("-inf"), m_safe + tl.log(denom))
  tl.store(out_ptr + tile, out.to(out_ptr.dtype.element_ty), mask=tile_ok)
  tl.store(lse_out_ptr + rows, lse, mask=row_ok)
