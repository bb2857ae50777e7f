"""Softmax attention and the variants expressed as score/mask mods over `attnjax.core.flex`.

  clipped_gated.py  clipped_softmax_gated_attention, clipped_softmax_attention: clipped softmax and
                    per-token head gates, heads that can do nothing (arXiv:2306.12929).
  adaptvis.py       temperature_on_token_subset, AdaptVis's logits of a key subset (image tokens)
                    times α, and its confidence rule for α (arXiv:2503.01773).
  cog.py            cog_attention, signed weights sign(s)e^|s| / Σ e^|s| (arXiv:2411.07176).
  comateformer.py   compositional_quasi_attention, Comateformer's signed weights tanh(q·k)·2σ(-‖q-k‖₁),
                    no softmax (arXiv:2412.07220).
  differential.py   differential_attention (DIFF Transformer, arXiv:2410.05258) and opamp_attention
                    (arXiv:2502.12502): two softmax maps, A_d(M1 - M2) + (A_c/2)(M1 + M2).
  dot_product.py    dot_product_attention (bias, masks, windows, packed documents, soft-capping,
                    GQA) and the `softmax` mechanism (Vaswani et al., arXiv:1706.03762).
  entity_aware.py   entity_aware_attention, LUKE's query per (query type, key type) pair of words
                    and entities (arXiv:2010.01057).
  entmax.py         entmax_attention (α fixed, or [N] per head) and adaptive_entmax_attention (α =
                    1 + sigmoid(a) learned per head): α-entmax, exact zeros (arXiv:2209.15176,
                    1909.00015, 1905.05702).
  forgetting.py     forgetting_attention, FoX's causal softmax with forget gates (arXiv:2503.02130).
  gaussian_adaptive.py  gaussian_adaptive_attention, GAAM / DAAM: each head's values times a
                    normalized product of Gaussian densities with learned offsets and scales
                    (arXiv:2401.11143, 2409.00391).
  gau.py            gated_attention_unit, GAU's relu(q·k/n)² weights (arXiv:2202.10447, 2406.15752).
  flex_variants.py  the FlexAttention paper's worked examples as mechanisms: flex, sliding_window,
                    alibi, softcap, document_masked, prefix_lm (Dong et al., arXiv:2412.05496).
  inside_outside.py  inside_outside_attention, Shape-Guided Diffusion's silhouette split: weights
                    between inside and outside tokens removed after the softmax (arXiv:2212.00210).
  lexicon_conditioned.py  lexicon_conditioned_attention (gate), lexicon_film_attention,
                    lexicon_concat_attention: scores conditioned on per-key lexicon features, values
                    unconditioned (arXiv:1906.03674).
  normalized_pooling.py  normalized_attention_pooling, NAP: scores standardized over each row's
                    visible keys, with a learned gain and shift per head (arXiv:2005.09561).
  region_modulated.py  region_modulated_attention, VideoGrain's same-region logits raised toward
                    the row max, cross-region ones lowered toward the min (arXiv:2502.17258).
  multi_token.py    multi_token_attention, MTA's key-query convolutions and head mixing around the
                    softmax (arXiv:2504.00927).
  rela.py           rectified_linear_attention, ReLU scores with a gated RMSNorm (arXiv:2104.07012).
  selective_masking.py  selective_attention_masking, every head's causal logits minus head 0's
                    accumulated ReLU logits F (arXiv:2410.02703).
  selective_temperature.py  selective_temperature_attention, SSA's query and value temperatures
                    1 + σ(α) log n + tanh(u·x) (arXiv:2411.12892).
  sinkhorn.py       sinkhorn_attention, OTSeg's Sinkhorn normalization of rows and columns toward
                    uniform transport marginals (arXiv:2403.14183).
  softplus.py       softplus_length_scaled_attention, LSSA: l1-normalized softplus of log d · log N
                    scaled cosine scores, and LSSAR's relu(N·a - 1)^p re-weighting (arXiv:2501.13428).
  softpick.py       softpick_attention, the rectified softmax without a sink (arXiv:2504.20966).
  threshold_relative.py  threshold_relative_attention, TRA's keys above a threshold and a distance
                    counting only those (arXiv:2503.23174).

Importing this package registers the mechanisms.
"""

from attnjax.ops.softmax.clipped_gated import (clipped_softmax_attention,
                                               clipped_softmax_gated_attention)
from attnjax.ops.softmax.adaptvis import temperature_on_token_subset
from attnjax.ops.softmax.cog import cog_attention
from attnjax.ops.softmax.comateformer import compositional_quasi_attention
from attnjax.ops.softmax.differential import differential_attention, opamp_attention
from attnjax.ops.softmax.dot_product import dot_product_attention, softmax_attention
from attnjax.ops.softmax.flex_variants import (alibi_attention, document_masked_attention,
                                               flex_mechanism, prefix_lm_attention,
                                               sliding_window_attention, softcap_attention)
from attnjax.ops.softmax.entity_aware import entity_aware_attention
from attnjax.ops.softmax.entmax import adaptive_entmax_attention, entmax_attention
from attnjax.ops.softmax.forgetting import forgetting_attention
from attnjax.ops.softmax.gau import gated_attention_unit
from attnjax.ops.softmax.gaussian_adaptive import gaussian_adaptive_attention
from attnjax.ops.softmax.inside_outside import inside_outside_attention
from attnjax.ops.softmax.lexicon_conditioned import lexicon_conditioned_attention
from attnjax.ops.softmax.multi_token import multi_token_attention
from attnjax.ops.softmax.normalized_pooling import normalized_attention_pooling
from attnjax.ops.softmax.rela import rectified_linear_attention
from attnjax.ops.softmax.region_modulated import region_modulated_attention
from attnjax.ops.softmax.selective_masking import selective_attention_masking
from attnjax.ops.softmax.selective_temperature import selective_temperature_attention
from attnjax.ops.softmax.sinkhorn import sinkhorn_attention
from attnjax.ops.softmax.softpick import softpick_attention
from attnjax.ops.softmax.softplus import softplus_length_scaled_attention
from attnjax.ops.softmax.threshold_relative import threshold_relative_attention

__all__ = ["alibi_attention", "clipped_softmax_attention", "clipped_softmax_gated_attention",
           "cog_attention", "document_masked_attention", "dot_product_attention",
           "flex_mechanism", "forgetting_attention", "gated_attention_unit", "inside_outside_attention",
           "lexicon_conditioned_attention",
           "multi_token_attention", "prefix_lm_attention",
           "rectified_linear_attention", "region_modulated_attention",
           "selective_attention_masking", "selective_temperature_attention",
           "sliding_window_attention", "softcap_attention",
           "softmax_attention", "softpick_attention",
           "differential_attention", "opamp_attention", "threshold_relative_attention",
           "entity_aware_attention", "temperature_on_token_subset",
           "entmax_attention", "adaptive_entmax_attention", "sinkhorn_attention",
           "compositional_quasi_attention", "gaussian_adaptive_attention",
           "normalized_attention_pooling", "softplus_length_scaled_attention"]
