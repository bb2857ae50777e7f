"""Causal cross-attention masks (CCAM): learned queries summarizing a video attend to its frames in
temporal order, the i-th query only to the frames up to its own time.

Fei, Li, Deng, Wang, Liu, Wang, "Video-CCAM: Enhancing Video-Language Understanding with Causal
Cross-Attention Masks for Short and Long Videos", arXiv:2408.14023. Q queries (the projector's
learned queries) cross-attend to the tokens of F frames laid out frame after frame; query i covers
the time slot [i/Q, (i+1)/Q) and frame t the slot [t/F, (t+1)/F), and

    query i sees frame t  ⟺  t/F < (i+1)/Q  ⟺  t·Q < (i+1)·F

so with Q = F the mask is lower-triangular over (query, frame), with more queries than frames a
group of Q/F consecutive queries shares each frame's horizon, and with more frames than queries (the
paper's long-video use: trained on 16 frames, run on 96) every query sees the frames of its slot and
before, the last query all of them. The same queries serve any frame count, which is what lets the
model run on more frames than it was trained on. Key s belongs to frame ⌊s·F / S⌋ (equal-sized
frames; S need not be a multiple of F). The paper's figure shows the lower-triangular Q = F case;
its exact rule for Q ≠ F was not reachable, and the slot rule above is our reading of "the i-th
query only sees frames up to its time index". A mask_mod on flex attention: every flex path serves it.

Shapes: `q [B,Q,N,H]` (the queries), `k [B,S,K,H]`, `v [B,S,K,h]` (the frames' tokens), `frames` F
→ `[B,Q,N,h]`.
"""

from __future__ import annotations

from typing import Optional

from attnjax.core import checks
from attnjax.core.contract import flex_with_contract
from attnjax.registry import Mechanism, register
from attnjax.typing import Key, Lengths, Output, Query, Value

__all__ = ["causal_cross_attention", "query_sees_frame"]


def query_sees_frame(query, frame, num_queries: int, frames: int):
  """True where query `query` (of Q) may attend to frame `frame` (of F): `frame·Q < (query+1)·F`."""
  return frame * num_queries < (query + 1) * frames


def causal_cross_attention(q: Query, k: Key, v: Value, *, frames: int, causal: bool = False,
                           segment_ids=None, q_offset=0, kv_lengths: Optional[Lengths] = None,
                           scale: Optional[float] = None,
                           implementation: Optional[str] = None) -> Output:
  """Cross-attention of Q learned queries to F frames' tokens under the causal mask (module
  docstring). `frames`: F, the number of frames the S keys are split into, in order."""
  op = "causal_cross_attention"
  _, T, S, _, _, _, _ = checks.check_qkv(op, q, k, v)
  if not isinstance(frames, int) or not 1 <= frames <= S:
    raise ValueError(f"{op}: `frames` must be an int in [1, S] = [1, {S}] (the keys are the "
                     f"frames' tokens in order), got {frames!r}")
  if causal:
    raise ValueError(f"{op}: the mask is the CCAM between queries and frames; `causal` (a token "
                     "order shared by queries and keys) does not apply")

  def mask_mod(b, n, qi, ki):
    del b, n
    return query_sees_frame(qi, (ki * frames) // S, T, frames)

  return flex_with_contract(op, q, k, v, causal=False, segment_ids=segment_ids, q_offset=q_offset,
                            kv_lengths=kv_lengths, scale=scale, implementation=implementation,
                            mask_mod=mask_mod)


register(Mechanism(
    name="causal_cross_attention", fn=causal_cross_attention, family="cross-attention",
    seeds=(94,),
    paper="Video-CCAM: Enhancing Video-Language Understanding with Causal Cross-Attention Masks "
          "for Short and Long Videos", arxiv="2408.14023",
    # Queries and frames are two sequences: cross-attention only; no decoding over a cache.
    patterns=frozenset({"cross"}), decode=False,
    example={"frames": 4}))
