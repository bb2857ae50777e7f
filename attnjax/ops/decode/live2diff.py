"""Live2Diff's uni-directional temporal attention with warm-up: frame p sees the warm-up frames and a
window of the frames just before it, never a future frame.

Temporal attention of a video diffusion model runs along the frame axis (one sequence per spatial
location: the batch folds them). Live2Diff replaces its bi-directional attention by

    o_p = Σ_{j ∈ V(p)} softmax_j(scale · q_p·k_j) v_j,
    V(p) = {j < warmup}  ∪  {j : 0 <= p - j < window}

the first `warmup` frames (denoised together at the start of the stream, which attend to each other
both ways) and the `window` most recent frames, frame p itself included. A frame past the warm-up
sees nothing later than itself, so it can be produced as soon as it arrives; the frames between the
warm-up and its window never reach it either, so a KV cache of `warmup + window` frames serves the
whole stream (`attnjax.core.sink_cache.SinkWindowCache` is that cache: its rule is this one with
warmup = sinks, causal within the sinks). The window mask is
`attnjax.core.sink_cache.sink_window_visible(..., bidirectional_sinks=True)`.

Positions are absolute (`q_offset + t` for the queries, the key index for the keys); with packed
sequences (`segment_ids`) each document has its own warm-up, its first `warmup` frames. Decoding
over a KV cache (`q_offset`, `kv_lengths`) equals the full forward once the warm-up frames are in
the cache (they see each other, so they cannot be produced one at a time). The paper's temporal
position encoding is added to the frames before q, k, v are projected (its streaming pipeline indexes
it by slot within the warm-up + window cache): that is the caller's, not this operator's. Shapes:
`q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]` → `[B,T,N,h]`.

Paper: Xing, Fox, Zeng, Pan, Elgharib, Theobalt and Chen, "Live2Diff: Live Stream Translation via
Uni-directional Attention in Video Diffusion Models", arXiv:2407.08701.
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from attnjax.core import checks
from attnjax.core import contract
from attnjax.core.sink_cache import check_sinks_and_window, sink_window_visible
from attnjax.registry import Mechanism, register
from attnjax.typing import Key, Lengths, Output, Query, Value

__all__ = ["warmup_window_temporal_attention"]


def warmup_window_temporal_attention(q: Query, k: Key, v: Value, *, warmup: int, window: int,
                                     causal: bool = True, segment_ids=None, q_offset=0,
                                     kv_lengths: Optional[Lengths] = None,
                                     scale: Optional[float] = None,
                                     implementation: Optional[str] = None) -> Output:
  """Live2Diff temporal attention: each frame sees the warm-up frames and its last `window` frames.

  Args:
    q: `[B, T, N, H]`; k: `[B, S, K, H]`; v: `[B, S, K, h]`, K dividing N.
    warmup: the number of warm-up frames every frame sees (>= 0); they see each other both ways.
    window: frames each frame sees up to itself, its own included (>= 1).
    causal: must be True: the mask is uni-directional by construction (the warm-up excepted).
    segment_ids, q_offset, kv_lengths, scale, implementation: the common contract
      (`attnjax.registry`); with `segment_ids` the warm-up is counted from each document's start.

  Returns:
    `[B, T, N, h]` in q's dtype.

  Raises:
    ValueError: `causal=False`, `warmup` < 0 or `window` < 1, or mis-shaped inputs.
  """
  op = "warmup_window_temporal_attention"
  warmup, window = check_sinks_and_window(op, warmup, window, sinks_name="warmup")
  if not causal:
    raise ValueError(f"{op}: Live2Diff's temporal attention is uni-directional (frames never see "
                     "later frames past the warm-up); call with causal=True")
  B, _, S, _, _, _, _ = checks.check_qkv(op, q, k, v)
  offset = jnp.asarray(q_offset, jnp.int32)   # its shape is checked with the contract's masks
  start = None
  if segment_ids is not None:
    kv_seg = segment_ids[1] if isinstance(segment_ids, (tuple, list)) else segment_ids
    checks.check_shape(op, "segment_ids (key)", kv_seg, (B, S), "[B, S]")
    start, _ = contract.document_bounds(kv_seg, B, S)   # each key's document start

  def mask_mod(b, n, q_idx, kv_idx):
    del n
    q_pos = q_idx + (offset[b] if offset.ndim == 1 else offset)
    # Within a document (the contract's document mask), positions count from its start.
    origin = 0 if start is None else start[b, kv_idx]
    return sink_window_visible(q_pos - origin, kv_idx - origin, sinks=warmup, window=window,
                               bidirectional_sinks=True)

  # Causality is in the mask (the warm-up frames see later warm-up frames), not the contract's.
  return contract.flex_with_contract(op, q, k, v, causal=False, segment_ids=segment_ids,
                                     q_offset=q_offset, kv_lengths=kv_lengths, scale=scale,
                                     implementation=implementation, mask_mod=mask_mod)


register(Mechanism(
    name="warmup_window_temporal_attention", fn=warmup_window_temporal_attention,
    family="decode-kvcache", seeds=(213,),
    paper="Live2Diff: Live Stream Translation via Uni-directional Attention in Video Diffusion "
          "Models", arxiv="2407.08701",
    patterns=frozenset({"causal_self", "causal_cross"}), complexity="O(T·(warmup + window))",
    # Three warm-up frames and a window of four, both shorter than the suite's sequences.
    example=dict(warmup=3, window=4),
    # Decoding reads the warm-up frames and the window: a fixed-size cache.
    # Decoding reads the warm-up and window slots; without settings (no defaults: the caller
    # chooses them) the size is only bounded by the cache.
    state_size=lambda T, N, K, H, h, kw: (
        min(kw["warmup"] + kw["window"], T) if {"warmup", "window"} <= set(kw) else T)
    * K * (H + h)))
