"""Positional transforms applied to queries and keys before a mechanism, and relative-position
mechanisms (registered, family "positional").

  rope.py     rotary position embedding, half-split convention (Su et al., "RoFormer",
              arXiv:2104.09864); `attnjax.nn.MultiHeadAttention` applies it when `rope_base` is set.
  shaw.py     relative_position_attention: clipped relative embeddings on keys and values (Shaw et
              al., arXiv:1803.02155).
  deberta.py  disentangled_attention: content + c2p + p2c with log-bucketed relative positions
              (DeBERTa, arXiv:2006.03654).
  ripo.py     ripo_attention: relative index, pitch and onset terms (Guo et al., arXiv:2212.00973).
  rope_scaling.py  RoPE context extension as Hugging Face's `rope_scaling`: linear position
              interpolation (arXiv:2306.15595), NTK-aware and dynamic NTK, YaRN (arXiv:2309.00071).
  fope.py     apply_fope: Fourier Position Embedding (Hua et al., arXiv:2412.17739).
  location.py GMM attention and Dynamic Convolution Attention, location-relative decoder alignment
              (Battenberg et al., arXiv:1910.10288): step functions and scans, not q, k, v mechanisms.
  skim.py     Skim-Attention: attention weights from document layout alone, and SkimmingMask
              (Nguyen et al., arXiv:2109.01078); the Skimformer layers are in attnjax/nn/skim.py.
"""

from attnjax.ops.positional.deberta import disentangled_attention
from attnjax.ops.positional.fope import apply_fope, fope_coefficients, fope_kept_pairs
from attnjax.ops.positional.location import (beta_binomial_prior, dca_attention_scan,
                                             dca_attention_step, gmm_attention_scan,
                                             gmm_attention_step)
from attnjax.ops.positional.ripo import ripo_attention
from attnjax.ops.positional.rope import (apply_rope, rope_frequencies, rope_parameters,
                                         rotary_dim, segment_positions)
from attnjax.ops.positional.rope_scaling import check_rope_scaling
from attnjax.ops.positional.shaw import relative_position_attention
from attnjax.ops.positional.skim import (apply_skim_weights, layout_embedding,
                                         skim_attention_weights, skimming_mask)

__all__ = ["apply_rope", "rope_frequencies", "rotary_dim", "segment_positions",
           "relative_position_attention", "disentangled_attention", "ripo_attention",
           "rope_parameters", "check_rope_scaling", "apply_fope", "fope_coefficients",
           "fope_kept_pairs", "beta_binomial_prior", "dca_attention_scan", "dca_attention_step",
           "gmm_attention_scan", "gmm_attention_step", "apply_skim_weights", "layout_embedding",
           "skim_attention_weights", "skimming_mask"]
