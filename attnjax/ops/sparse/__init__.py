"""Block-sparse and token-sparse attention chosen from the data (families "sparse-trainable" and
"sparse-inference"): selection by pooled block scores (`attnjax.core.sparse`) into a traced
`BlockMask` for `flex_attention`, or a token index set for decoding.

  moba.py       MoBA: each query's own block + top-k blocks by q · mean(k_block) (#191)
  nsa.py        NSA: gated compressed / top-n selected / sliding-window branches (#156)
  seer.py       SeerAttention: a learned AttnGate's top-k / threshold key blocks per query block,
                its block-max-pooled training target and KL loss (#78)
  landmark.py   Landmark attention: grouped softmax via each block's landmark, top-k retrieval (#228)
  hip.py        HiP: tree search (2k chunks by centre keys, keep k, halve) for each query's blocks (#84)
  hyper.py      HyperAttention: sortLSH block-diagonal attention + sampled residual, recursion (#85)
  loki.py       Loki: exact attention over each query's top-k keys by PCA-projected scores (#227)
  longheads.py  LongHeads: per-head top-k chunks by q · pooled chunk key; first/prev/own forced (#197)
  delta.py      Delta Attention: sparse output + (dense - sparse) of every gamma-th row (#41)
  rettention.py Re-ttention: sparse softmax x cached normalizer ratio + cached residual (#160)
  head_detection.py  QAdA: Gaussian second-moment test of each head's long-context mass (#199)
  tidal_decode.py    TidalDecode: selection layers' top-k positions reused by sparse layers (#119)
  flexprefill.py     FlexPrefill: per head, a query-aware or vertical-slash block pattern (sqrt JS
                     divergence test on the last query block) covering gamma of the mass (#14)
  spatial_sparse.py  SSA (Direct3D-S2): NSA's branches on a voxel grid, 3-D blocks and windows (#159)

Each module registers its mechanisms or declares the rows it serves (`attnjax.catalog.serves`).
"""

from attnjax.ops.sparse.delta import (delta_corrected_attention, delta_corrected_sliding_window,
                                      delta_correction)
from attnjax.ops.sparse.flexprefill import (FlexPrefillSelection, cumulative_mass_cover,
                                            flexprefill_attention, flexprefill_selection)
from attnjax.ops.sparse.head_detection import (key_moments, long_context_head_detector,
                                               long_context_mass)
from attnjax.ops.sparse.hip import hip_attention, hip_iterations, hip_selection
from attnjax.ops.sparse.hyper import angular_lsh_buckets, gray_code_order, hyper_attention
from attnjax.ops.sparse.landmark import landmark_attention, landmark_weights
from attnjax.ops.sparse.loki import loki_attention, loki_calibrate, loki_scores
from attnjax.ops.sparse.longheads import (longheads_attention, longheads_selection,
                                          longheads_summaries)
from attnjax.ops.sparse.moba import moba_attention, moba_selection
from attnjax.ops.sparse.nsa import native_sparse_attention
from attnjax.ops.sparse.rettention import rettention_attention, rettention_statistics
from attnjax.ops.sparse.seer import (seer_attention, seer_gate_logits, seer_gate_loss,
                                     seer_gate_target)
from attnjax.ops.sparse.spatial_sparse import spatial_sparse_attention
from attnjax.ops.sparse.tidal_decode import tidal_layer_roles, tidal_select, tidal_sparse_attention

__all__ = ["angular_lsh_buckets", "cumulative_mass_cover", "delta_corrected_attention",
           "delta_corrected_sliding_window", "delta_correction", "flexprefill_attention",
           "flexprefill_selection", "FlexPrefillSelection", "gray_code_order", "hip_attention",
           "hip_iterations", "hip_selection", "hyper_attention", "key_moments", "landmark_attention",
           "landmark_weights",
           "loki_attention", "loki_calibrate", "loki_scores", "long_context_head_detector",
           "long_context_mass", "longheads_attention", "longheads_selection", "longheads_summaries",
           "moba_attention", "moba_selection", "native_sparse_attention", "rettention_attention",
           "rettention_statistics", "seer_attention", "seer_gate_logits", "seer_gate_loss",
           "seer_gate_target", "spatial_sparse_attention", "tidal_layer_roles", "tidal_select",
           "tidal_sparse_attention"]
