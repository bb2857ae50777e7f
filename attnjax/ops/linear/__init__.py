"""Linear attention mechanisms: feature maps, gates and normalizations on `gated_linear_attention`.

Each mechanism maps q and k through its feature map φ, builds its gate, and hands the rest to the
primitive (`attnjax.core.linear`) through `attnjax.core.linear_contract.feature_linear_attention`,
which adapts it to the common call contract (full sequences, KV caches, recurrent decoding).

  cosine.py     cosine_linear_attention (Cottention, arXiv:2409.18747)
  efficient.py  efficient_attention (Efficient Attention, arXiv:1812.01243)
  lightning.py  lightning_attention_2 (Lightning Attention-2, arXiv:2401.04658)
  favor.py      favor_plus_attention (Performer FAVOR+, arXiv:2009.14794)
  lognormal.py  linear_lognormal_attention (Linear Log-Normal attention, arXiv:2311.13541)
  taylor.py     taylor_shift_attention, fastmax_attention (TaylorShift, arXiv:2403.02920; FAST,
                arXiv:2402.07901): second-order Taylor features
  regla.py      refined_gated_linear_attention (ReGLA, arXiv:2502.01578)
  rala.py       rank_augmented_linear_attention (RALA, arXiv:2411.07635)
  latte.py      latte_attention (Latte, arXiv:2402.17512)

Importing this package registers the mechanisms.
"""

from attnjax.ops.linear.cosine import cosine_linear_attention
from attnjax.ops.linear.efficient import efficient_attention
from attnjax.ops.linear.favor import favor_plus_attention, orthogonal_features_init
from attnjax.ops.linear.latte import LATTE_LATENTS, latte_attention
from attnjax.ops.linear.lightning import lightning_attention_2, lightning_decay_rates
from attnjax.ops.linear.lognormal import linear_lognormal_attention
from attnjax.ops.linear.rala import rank_augmented_linear_attention
from attnjax.ops.linear.regla import refined_gate, refined_gated_linear_attention
from attnjax.ops.linear.taylor import (fastmax_attention, taylor_crossover_length,
                                       taylor_shift_attention)

__all__ = ["LATTE_LATENTS", "cosine_linear_attention", "efficient_attention", "fastmax_attention",
           "favor_plus_attention", "latte_attention", "lightning_attention_2",
           "lightning_decay_rates", "linear_lognormal_attention", "orthogonal_features_init",
           "rank_augmented_linear_attention", "refined_gate", "refined_gated_linear_attention",
           "taylor_crossover_length", "taylor_shift_attention"]
