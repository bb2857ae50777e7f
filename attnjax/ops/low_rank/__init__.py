"""Low-rank and global-summary attention: Linformer, Agent, RITA group, YOSO, SwiftFormer, Lada.

Each replaces the `[T, S]` softmax by attention over a small set of summary tokens (projected,
pooled or clustered keys, one pooled global query) or, for YOSO, by a hashing estimate of a
collision-probability kernel. Importing this package registers the mechanisms.

  linformer_attention   softmax(Q (E K)ᵀ s) (F V)                E, F: [k, S_max] learned     O(T·k)
  agent_attention       softmax(Q Aᵀ s) softmax(A Kᵀ s) V + DWC(V),  A = pool(Q), n agents    O(T·n)
  group_attention       softmax(Q Cᵀ s + log |g|) V̄              C: k-means centroids of K   O(T·G)
  yoso_attention        Σ_j (1 - arccos(q̂·k̂_j)/π)^τ v_j, L2-normalised; LSH-sampled        O(T·m)
  efficient_additive_attention   o_t = (g ⊙ k̂_t) W_T + b_T + v̂_t   (SwiftFormer)        O(T·H)
  linear_additive_attention      o_t = v_t ⊙ k_t ⊙ g                 (Ladaformer)         O(T·H)
"""

from attnjax.ops.low_rank.additive import efficient_additive_attention, linear_additive_attention
from attnjax.ops.low_rank.agent import adaptive_pool_weights, agent_attention
from attnjax.ops.low_rank.group import group_attention, kmeans_groups
from attnjax.ops.low_rank.linformer import linformer_attention
from attnjax.ops.low_rank.yoso import yoso_attention

__all__ = ["adaptive_pool_weights", "agent_attention", "efficient_additive_attention",
           "group_attention", "kmeans_groups", "linear_additive_attention", "linformer_attention",
           "yoso_attention"]
