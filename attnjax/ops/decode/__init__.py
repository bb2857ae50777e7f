"""Decode-phase mechanisms (queries over a KV cache).

  split_k.py  split_k_decode: split-K attention over the key axis with an exact log-sum-exp merge
              (Sanovar et al., "Lean Attention", arXiv:2405.10480).
  slim.py     slim_attention: only keys are cached, values are K · W_K⁻¹W_V; slim_kv_map
              (Graef and Wasielewski, "Slim attention", arXiv:2503.05840).
  round.py    round_attention: attention over the top-k dialogue rounds and the current one;
              select_rounds (Tang et al., "Round Attention", arXiv:2502.15294).
  live2diff.py  warmup_window_temporal_attention: each frame sees the warm-up frames and a window
              of the frames before it (Xing et al., "Live2Diff", arXiv:2407.08701).
  block_rag.py  block_attention_rag: passages attend within themselves, the final block to
              everything; rerotate_keys moves cached RoPE keys ("Block-Attention for Efficient
              RAG", arXiv:2409.15355).
  avl.py      avl_modality_adaptive_attention: text through a local window, image tokens through a
              core chosen by attention; avl_decode_step (its periodic refresh),
              select_core_image_tokens (Zhang et al., "A-VL", arXiv:2409.14846).

Importing this package registers the mechanisms.
"""

from attnjax.ops.decode.avl import (avl_decode_step, avl_modality_adaptive_attention,
                                    select_core_image_tokens)
from attnjax.ops.decode.block_rag import block_attention_rag, rerotate_keys
from attnjax.ops.decode.live2diff import warmup_window_temporal_attention
from attnjax.ops.decode.round import round_attention, select_rounds
from attnjax.ops.decode.slim import slim_attention, slim_kv_map
from attnjax.ops.decode.split_k import split_k_decode

__all__ = ["round_attention", "select_rounds", "slim_attention", "slim_kv_map", "split_k_decode",
           "warmup_window_temporal_attention", "block_attention_rag", "rerotate_keys",
           "avl_modality_adaptive_attention", "avl_decode_step", "select_core_image_tokens"]
