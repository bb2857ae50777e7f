"""Fixed-size recurrent decoding state of the memory mechanisms: a linear memory plus a local buffer.

Infini-attention, LAVO and CHELA decode with a state of fixed size (`Mechanism.recurrent`): a
linear memory `S = Σ_j φ(k_j) u_jᵀ` (per key/value head) and a bounded buffer of the most recent
tokens (the current segment, the local window, the convolutions' inputs). This module holds what
their recurrent paths share:

  check_recurrent_call   the recurrent contract: the T new tokens of one causal sequence, after
                         `q_offset` earlier ones (a Python int, a traced scalar or `[B]`)
  checked_state          the carried state validated against its fixed shapes (zeros when None)
  shift_in               a buffer of the last W tokens followed by the new ones, and its new value
  tokens_before, slot_positions, recent_mask
                         the positions of `[buffer; new]` and the causal mask of the new tokens over
                         it (within a chunk / window, or a bounded memory): Mega, SHA-RNN, RAN
  linear_with_state      `o_t = scale · q_t (S_0 + Σ_{j≤t} k_j u_jᵀ)` over the new tokens, and the
                         memory after them

Shapes use the letters of `attnjax.typing`: `[B, T, N, F]` queries, `[B, T, K, F]` keys, `[B, K, F, d]`
memory (K divides N; query head n reads key/value head n // (N/K)).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.core import checks
from attnjax.core import contract
from attnjax.core.linear import gated_linear_attention
from attnjax.core.linear_contract import check_recurrent_args
from attnjax.typing import Array, Float, Key, Output, Query, Value

_F32 = jnp.float32
_HIGHEST = jax.lax.Precision.HIGHEST
# A linear memory per key/value head: `Σ_j φ(k_j) u_jᵀ` (letters of `attnjax.typing`; F = H, d = h).
Memory = Float[Array, "B K H h"]

__all__ = ["check_recurrent_call", "checked_state", "linear_with_state", "recent_mask", "shift_in",
           "slot_positions", "tokens_before"]


def check_recurrent_call(op: str, *, causal: bool, segment_ids, kv_lengths, T: int, S: int,
                         q_offset=None) -> None:
  """The recurrent form's contract: causal self-attention over the T == S new tokens of one
  sequence per batch row (no `segment_ids`, no `kv_lengths`); a `q_offset` given here must be one
  scalar (the number of earlier tokens, shared by the batch: the layer's cache index), for a state
  whose layout depends on it."""
  check_recurrent_args(op, causal=causal, segment_ids=segment_ids, T=T, S=S)
  if kv_lengths is not None:
    raise ValueError(f"{op}: recurrent decoding takes the new tokens only; `kv_lengths` is not "
                     "supported there")
  if q_offset is not None and jnp.ndim(q_offset) != 0:
    raise ValueError(f"{op}: recurrent decoding needs `q_offset` as one scalar (tokens already "
                     f"carried in the state), got shape {jnp.shape(q_offset)}")


def checked_state(op: str, state: Optional[dict], shapes: dict[str, tuple[int, ...]],
                  letters: dict[str, str]) -> dict[str, jax.Array]:
  """The carried state as float32 arrays of the fixed `shapes` (zeros, "no tokens yet", when None).

  `letters` gives each entry's shape in letters for the error message (e.g. "[B, K, H, h]").
  """
  if state is None:
    return {name: jnp.zeros(shape, _F32) for name, shape in shapes.items()}
  if not isinstance(state, dict) or set(state) != set(shapes):
    got = sorted(state) if isinstance(state, dict) else type(state).__name__
    raise ValueError(f"{op}: `initial_state` must be the dict {sorted(shapes)} returned with "
                     f"`return_final_state=True`, got {got}")
  for name, shape in shapes.items():
    checks.check_shape(op, f"initial_state[{name!r}]", state[name], shape, letters[name])
  return {name: jnp.asarray(state[name], _F32) for name in shapes}


def shift_in(buffer: jax.Array, new: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`buffer [B, W, ...]` (the last W tokens) then `new [B, T, ...]`: the stream `[B, W + T, ...]`
  float32 and the buffer after the new tokens (its last W slots)."""
  stream = jnp.concatenate([buffer.astype(_F32), new.astype(_F32)], axis=1)
  return stream, stream[:, stream.shape[1] - buffer.shape[1]:]


def linear_with_state(qf: Query, kf: Key, values: Value, memory: Memory, *, scale: float,
                      chunk_size: int, implementation: str) -> tuple[Output, Memory]:
  """Causal linear attention over T new tokens on top of a memory of the earlier ones.

      o_t = scale · q_t · (S_0 + Σ_{j≤t} k_j u_jᵀ),      S_T = S_0 + Σ_j k_j u_jᵀ

  qf `[B, T, N, F]`, kf `[B, T, K, F]`, values u `[B, T, K, d]`, memory S_0 `[B, K, F, d]` ->
  (o `[B, T, N, d]`, S_T `[B, K, F, d]`), float32. The new tokens run through
  `gated_linear_attention` (its chunked form for "xla"); S_0 enters as one product per query.
  Keeping S per key/value head (not per query head) is what makes the state GQA-sized.
  """
  B, T, N, F = qf.shape
  K = kf.shape[2]
  qf, kf, values = (x.astype(_F32) for x in (qf, kf, values))
  intra = gated_linear_attention(qf, kf, values, causal=True, scale=scale, chunk_size=chunk_size,
                                 implementation=implementation)
  carried = jnp.einsum("btkgf,bkfd->btkgd", qf.reshape(B, T, K, N // K, F), memory,
                       precision=_HIGHEST).reshape(intra.shape)
  memory = memory + jnp.einsum("btkf,btkd->bkfd", kf, values, precision=_HIGHEST)
  return intra.astype(_F32) + scale * carried, memory


def tokens_before(B: int, q_offset) -> jax.Array:
  """n `[B]` int32: the tokens before the call (`q_offset`: a Python int, a traced int scalar or a
  `[B]` array)."""
  return contract.query_positions(B, 1, q_offset)[:, 0]


def slot_positions(n: jax.Array, R: int, T: int) -> jax.Array:
  """Positions of the slots of `[buffer; new]` (a buffer of R): `n - R + s`, `[B, R + T]` int32
  (negative: empty)."""
  return n[:, None] - R + jnp.arange(R + T, dtype=jnp.int32)[None]


def recent_mask(n: jax.Array, R: int, *, block: Optional[int] = None,
                memory: Optional[int] = None):
  """The causal `mask_mod(b, head, t, s)` of new token t (position n + t) over slot s of
  `[buffer; new]` (position n - R + s): the slot is filled (position >= 0) and not after the
  query; with `block`, in the query's aligned block of `block` positions (chunks, windows); with
  `memory`, at most `memory` positions before the query."""

  def mask_mod(b, head, q_idx, kv_idx):
    del head
    row = n[b]
    q_pos, k_pos = row + q_idx, row - R + kv_idx
    keep = (k_pos >= 0) & (k_pos <= q_pos)
    if block is not None:
      keep = keep & (k_pos // block == q_pos // block)
    if memory is not None:
      keep = keep & (q_pos - k_pos <= memory)
    return keep

  return mask_mod
