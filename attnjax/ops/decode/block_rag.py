"""Block-Attention for RAG: retrieved passages attend only within themselves, the final block (the
user query) attends to everything, and a passage's cached keys move to any offset by a rotation.

The prompt is cut into blocks, given per token as `block_ids [B, S]` (a system prompt, each
retrieved passage, the user's query). A query at position p in block b_p sees

    V(p) = {j <= p : block_ids[j] == b_p}       a passage (or any block but the last), causally
    V(p) = {j <= p}                             the final block: b_p == query_block_id

    o_p = Σ_{j ∈ V(p)} softmax_j(scale · q_p·k_j) v_j.

The final block is marked by the id `query_block_id` (-1 by default); the tokens generated after it
carry that id too, so decoding continues the final block over the KV cache (`q_offset`,
`kv_lengths`; the ids are a per-key-token input the layer caches beside the keys). Ids of the other
blocks are any other ints, one per block.

A passage's outputs and KV never depend on the other passages, so its KV can be computed once, at
position offset 0, and reused in any prompt. Its keys were rotated by RoPE at positions 0..L-1; at
offset δ in the assembled cache they must be rotated at δ..δ+L-1, and since RoPE rotates each pair of
dims by an angle linear in the position, R(p + δ) = R(δ) R(p): `rerotate_keys(k, δ)` applies R(δ)
to keys already rotated (the paper's position re-encoding; its values need nothing).

Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]`, `block_ids [B,S]` → `[B,T,N,h]`.
Paper: "Block-Attention for Efficient RAG", arXiv:2409.15355.
"""

from __future__ import annotations

from typing import Optional, Union

import jax.numpy as jnp

from attnjax.core import checks
from attnjax.core import contract
from attnjax.ops.positional import rope
from attnjax.ops.positional import rope_scaling
from attnjax.registry import Mechanism, TokenInput, register
from attnjax.typing import Array, Int, Key, Lengths, Output, PerKeyToken, Query, Value

__all__ = ["block_attention_rag", "rerotate_keys"]

# A shift for every key, one per sequence, or one per key token.
ScalarShift = Int[Array, ""]
RowShifts = Int[Array, "B"]
TokenShifts = Int[Array, "B S"]
Shift = Union[int, ScalarShift, RowShifts, TokenShifts]
# The conformance suite draws block ids in [0, _EXAMPLE_BLOCKS); the operator takes any ints.
_EXAMPLE_BLOCKS = 3


def block_attention_rag(q: Query, k: Key, v: Value, *, block_ids: PerKeyToken,
                        query_block_id: int = -1, causal: bool = True, segment_ids=None,
                        q_offset=0, kv_lengths: Optional[Lengths] = None,
                        scale: Optional[float] = None,
                        implementation: Optional[str] = None) -> Output:
  """Block-Attention: passages attend within themselves, the final block attends to everything.

  Args:
    q: `[B, T, N, H]`; k: `[B, S, K, H]`; v: `[B, S, K, h]`, K dividing N (self-attention: T == S,
      or new tokens over a KV cache with `q_offset` and `kv_lengths`).
    block_ids: `[B, S]` int, each token's block; a query's block is the id at its own position.
    query_block_id: the id of the final block (the user query and what is generated after it).
    causal: must be True (a decoder's prompt).
    segment_ids, q_offset, kv_lengths, scale, implementation: the common contract
      (`attnjax.registry`).

  Returns:
    `[B, T, N, h]` in q's dtype.

  Raises:
    ValueError: `causal=False`, or mis-shaped inputs.
  """
  op = "block_attention_rag"
  if not causal:
    raise ValueError(f"{op}: Block-Attention is a causal decoder's mask; call with causal=True")
  B, T, S, _, _, _, _ = checks.check_qkv(op, q, k, v)
  checks.check_shape(op, "block_ids", block_ids, (B, S), "[B, S]")
  contract.check_self_attention(op, T=T, S=S, q_offset=q_offset, kv_lengths=kv_lengths,
                                segment_ids=segment_ids)
  block_ids = jnp.asarray(block_ids, jnp.int32)
  own = contract.gather_positions(block_ids, contract.query_positions(B, T, q_offset))   # [B, T]

  def mask_mod(b, n, q_idx, kv_idx):
    del n
    mine = own[b, q_idx]
    return (mine == query_block_id) | (block_ids[b, kv_idx] == mine)

  return contract.flex_with_contract(op, q, k, v, causal=True, segment_ids=segment_ids,
                                     q_offset=q_offset, kv_lengths=kv_lengths, scale=scale,
                                     implementation=implementation, mask_mod=mask_mod)


def rerotate_keys(k: Key, delta: Shift, *, base: float = 10000.0, fraction: float = 1.0,
                  dim: Optional[int] = None, scaling=None) -> Key:
  """Keys rotated by RoPE at positions p, moved to positions p + δ: `R(δ) k` (module docstring).

  The same RoPE as `attnjax.ops.positional.rope.apply_rope` (half-split pairs, partial rotary by
  `fraction` or `dim`, the context extensions of `scaling`): "linear" rotates p as p / s, so a shift
  of δ is one of δ / s, and "ntk" only changes the base, both still rotations; YaRN's attention factor
  `m` multiplies the keys once, when they were first rotated, so the shift is the pure rotation
  (m = 1). Dynamic NTK ("dynamic") rescales the frequencies with the sequence length: a key
  rotated in a short passage has other frequencies than one at its new position, which no rotation
  repairs, so it raises.

  Args:
    k: `[B, S, K, H]` keys already rotated (any float dtype; the rotation runs in float32).
    delta: the shift in positions: an int, `[B]` (one per sequence) or `[B, S]` (one per key, e.g.
      each passage of an assembled cache by its own offset); negative shifts undo one.
    base, fraction, dim, scaling: those the keys were rotated with (`apply_rope`).

  Returns:
    `[B, S, K, H]` in k's dtype.

  Raises:
    ValueError: a "dynamic" `scaling`, or a `delta` of another shape.
  """
  op = "rerotate_keys"
  if jnp.ndim(k) != 4:
    raise ValueError(f"{op}: `k` must have shape [B, S, K, H], got shape {jnp.shape(k)}")
  B, S = k.shape[:2]
  delta = jnp.asarray(delta)
  if not jnp.issubdtype(delta.dtype, jnp.integer):
    raise ValueError(f"{op}: `delta` must be an integer shift, got dtype {delta.dtype}")
  if delta.ndim == 1 and delta.shape == (B,):
    delta = delta[:, None]
  elif delta.ndim not in (0, 2) or (delta.ndim == 2 and delta.shape != (B, S)):
    raise ValueError(f"{op}: `delta` must be an int, [B] = [{B}] or [B, S] = [{B}, {S}], got "
                     f"shape {delta.shape}")
  shift = jnp.broadcast_to(delta, (B, S)).astype(jnp.int32)
  scaling = rope_scaling.check_rope_scaling(scaling)
  if scaling is not None and scaling["rope_type"] == "dynamic":
    raise ValueError(f"{op}: dynamic NTK scaling rescales RoPE's frequencies with the sequence "
                     "length, so a key cannot be moved to another position by a rotation; "
                     "recompute it, or use a fixed scaling ('linear', 'ntk', 'yarn')")
  if scaling is not None and scaling["rope_type"] == "yarn":
    # The keys already carry YaRN's factor m: shift by the rotation alone.
    scaling = {**scaling, "attention_factor": 1.0}
  return rope.apply_rope(k, shift, base=base, fraction=fraction, dim=dim, scaling=scaling)


register(Mechanism(
    name="block_attention_rag", fn=block_attention_rag, family="decode-kvcache", seeds=(135,),
    paper="Block-Attention for Efficient RAG", arxiv="2409.15355",
    patterns=frozenset({"causal_self"}),
    token_inputs=(TokenInput("block_ids", side="kv", kind="given", dtype="int",
                             num_values=_EXAMPLE_BLOCKS),),
    # The suite draws ids 0..2: block 0 is the final block, so some tokens see everything before
    # them and the others only their own block.
    example={"query_block_id": 0}))
