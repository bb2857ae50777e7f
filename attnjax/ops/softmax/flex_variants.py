"""The attention variants the FlexAttention paper expresses as score/mask mods, registered by name.

Each is softmax attention over `flex_attention` with one mod added to the common contract's masks
(causal, packed documents, padding). Paper: Dong et al., "Flex Attention: A Programming Model for
Generating Optimized Attention Kernels", arXiv:2412.05496 (ALiBi, sliding window, PrefixLM, document
masking and soft-capping are its worked examples).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from attnjax.core import masks
from attnjax.core.contract import flex_with_contract as _flex_with
from attnjax.registry import Mechanism, register
from attnjax.typing import Key, Lengths, Output, Query, Value

__all__ = ["alibi_attention", "document_masked_attention", "flex_mechanism",
           "prefix_lm_attention", "sliding_window_attention", "softcap_attention"]

_GEMMA2_CAP = 50.0
_FLEX_PAPER = dict(paper="Flex Attention: A Programming Model for Generating Optimized Attention "
                         "Kernels", arxiv="2412.05496")


def flex_mechanism(q: Query, k: Key, v: Value, *, causal: bool = False, segment_ids=None,
                   q_offset=0, kv_lengths: Optional[Lengths] = None, scale: Optional[float] = None,
                   implementation: Optional[str] = None, score_mod=None, mask_mod=None,
                   block_mask=None, normalizer="softmax") -> Output:
  """Flex attention: user score_mod / mask_mod / block mask / normalizer on top of the contract masks."""
  return _flex_with("flex", q, k, v, causal=causal, segment_ids=segment_ids, q_offset=q_offset,
                    kv_lengths=kv_lengths, scale=scale, implementation=implementation,
                    mask_mod=mask_mod, score_mod=score_mod, block_mask=block_mask,
                    normalizer=normalizer)


def sliding_window_attention(q: Query, k: Key, v: Value, *, window: int, causal: bool = False,
                             segment_ids=None, q_offset=0, kv_lengths: Optional[Lengths] = None,
                             scale: Optional[float] = None,
                             implementation: Optional[str] = None) -> Output:
  """Sliding-window attention: each query sees the `window` nearest keys on each allowed side.

  `window` (required) counts keys, the query's own position included: causal, keys at positions
  `[p - window + 1, p]` (Mistral / Longformer's one-sided window); non-causal, `|p - j| < window`
  (`2·window - 1` keys). This is the library's one meaning of an integer window (as
  `dot_product_attention(window=w)`); `masks.sliding_window(window - 1, window - 1)` gives it in
  distances. A window of at least the sequence length equals full (or causal) attention.
  """
  return _flex_with("sliding_window", q, k, v, causal=causal, segment_ids=segment_ids,
                    q_offset=q_offset, kv_lengths=kv_lengths, scale=scale,
                    implementation=implementation, mask_mod=_window_mask(window, q_offset))


def _window_mask(window, q_offset=0):
  if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
    raise ValueError(f"sliding_window: `window` must be an int >= 1 (keys each query sees on each "
                     f"allowed side, its own included), got {window!r}")
  return masks.sliding_window(window - 1, window - 1, offset=q_offset)


def alibi_attention(q: Query, k: Key, v: Value, *, causal: bool = False, segment_ids=None,
                    q_offset=0, kv_lengths: Optional[Lengths] = None, scale: Optional[float] = None,
                    implementation: Optional[str] = None, slopes=None) -> Output:
  """ALiBi: softmax attention with a per-head linear distance penalty `-m_n · |i - j|`, no positions.

  `slopes: [N]` defaults to the paper's geometric sequence. Press et al., "Train Short, Test Long:
  Attention with Linear Biases Enables Input Length Extrapolation", arXiv:2108.12409.
  """
  slopes = masks.alibi_slopes(q.shape[2]) if slopes is None else slopes
  return _flex_with("alibi", q, k, v, causal=causal, segment_ids=segment_ids, q_offset=q_offset,
                    kv_lengths=kv_lengths, scale=scale, implementation=implementation,
                    score_mod=masks.alibi(slopes, offset=q_offset, symmetric=not causal))


def softcap_attention(q: Query, k: Key, v: Value, *, cap: float = _GEMMA2_CAP, causal: bool = False,
                      segment_ids=None, q_offset=0, kv_lengths: Optional[Lengths] = None,
                      scale: Optional[float] = None,
                      implementation: Optional[str] = None) -> Output:
  """Soft-capped attention: logits `cap · tanh(s / cap)` before softmax (Gemma 2 uses cap = 50).

  Gemma Team, "Gemma 2: Improving Open Language Models at a Practical Size", arXiv:2408.00118.
  """
  return _flex_with("softcap", q, k, v, causal=causal, segment_ids=segment_ids, q_offset=q_offset,
                    kv_lengths=kv_lengths, scale=scale, implementation=implementation,
                    score_mod=masks.softcap(cap))


def document_masked_attention(q: Query, k: Key, v: Value, *, causal: bool = False,
                              segment_ids=None, q_offset=0, kv_lengths: Optional[Lengths] = None,
                              scale: Optional[float] = None,
                              implementation: Optional[str] = None) -> Output:
  """Document masking for packed sequences: a token attends only within its own `segment_ids`.

  Equals running each document separately, with no padding. Without `segment_ids` it is plain
  attention (one document).
  """
  return _flex_with("document_masked", q, k, v, causal=causal, segment_ids=segment_ids,
                    q_offset=q_offset, kv_lengths=kv_lengths, scale=scale,
                    implementation=implementation)


def prefix_lm_attention(q: Query, k: Key, v: Value, *, prefix_length, causal: bool = True,
                        segment_ids=None, q_offset=0, kv_lengths: Optional[Lengths] = None,
                        scale: Optional[float] = None,
                        implementation: Optional[str] = None) -> Output:
  """Prefix-LM attention: bidirectional over the first `prefix_length` positions, causal after.

  `prefix_length`: int or `[B]`. Raffel et al. (T5), arXiv:1910.10683, section 3.2.1.
  Decoding over a cache equals the full forward once the prefill covers the prefix: prefix tokens
  see later prefix tokens, so they cannot be produced one at a time.
  """
  if not causal:
    raise ValueError("prefix_lm: the prefix-LM mask is causal after the prefix; call with "
                     "causal=True")
  return _flex_with("prefix_lm", q, k, v, causal=False, segment_ids=segment_ids, q_offset=q_offset,
                    kv_lengths=kv_lengths, scale=scale, implementation=implementation,
                    mask_mod=masks.prefix_lm(prefix_length, offset=q_offset))


# Each variant as plain flex attention under its mods (`Mechanism.flex_mods`), positions global.
def _no_mods(causal, num_heads):
  return {}


def _window_mods(causal, num_heads, window):
  return dict(mask_mod=_window_mask(window))


def _alibi_mods(causal, num_heads, slopes=None):
  slopes = masks.alibi_slopes(num_heads) if slopes is None else slopes
  return dict(score_mod=masks.alibi(slopes, symmetric=not causal))


def _softcap_mods(causal, num_heads, cap=_GEMMA2_CAP):
  return dict(score_mod=masks.softcap(cap))


def _prefix_lm_mods(causal, num_heads, prefix_length):
  if not causal:
    raise ValueError("prefix_lm: the prefix-LM mask is causal after the prefix; call with "
                     "causal=True")
  if isinstance(prefix_length, bool) or not isinstance(prefix_length, (int, np.integer)):
    return None   # a prefix per example indexes the batch, which a sharded form splits
  return dict(mask_mod=masks.prefix_lm(int(prefix_length)), causal=False)


register(Mechanism(name="flex", fn=flex_mechanism, family="kernel", seeds=(195,),
                   **_FLEX_PAPER, example=dict(score_mod=masks.softcap(20.0))))
register(Mechanism(name="sliding_window", fn=sliding_window_attention, family="local-window",
                   seeds=(195,), **_FLEX_PAPER, complexity="O(T·w)", example=dict(window=5),
                   # No default window: a default larger than every test length is full attention.
                   # Decoding reads the last `window` cache slots (all of them when no window is
                   # given: the size is then only bounded by the cache).
                   state_size=lambda T, N, K, H, h, kw: (
                       min(kw.get("window") or T, T) * K * (H + h)), flex_mods=_window_mods))
register(Mechanism(name="alibi", fn=alibi_attention, family="positional", seeds=(195,),
                   paper="Train Short, Test Long: Attention with Linear Biases Enables Input "
                         "Length Extrapolation", arxiv="2108.12409", flex_mods=_alibi_mods))
register(Mechanism(name="softcap", fn=softcap_attention, family="softmax-variant", seeds=(195,),
                   **_FLEX_PAPER, example=dict(cap=2.0), flex_mods=_softcap_mods))
register(Mechanism(name="document_masked", fn=document_masked_attention, family="softmax-core",
                   seeds=(195,), **_FLEX_PAPER, flex_mods=_no_mods))
register(Mechanism(name="prefix_lm", fn=prefix_lm_attention, family="softmax-core", seeds=(195,),
                   **_FLEX_PAPER, patterns=frozenset({"causal_self", "causal_cross"}),
                   # The prefix is in absolute positions, not per packed document.
                   packed=False, example=dict(prefix_length=5), flex_mods=_prefix_lm_mods))
