"""Local, window and neighborhood attention (family "local-window"): static structure as a `mask_mod`
over 1-D or N-D token positions (`attnjax.core.grid`, `attnjax.core.windows`), so `flex_attention`'s
block skipping visits only the tiles a window touches.

  neighborhood.py  neighborhood attention: NA (+ rpb), dilated NA, generalized NA (#183, #154, #121)
  window.py     Swin (shifted) window attention (+ relative bias); MSWA per-head windows (#164, #175)
  hilo.py       HiLo: Hi-Fi heads in s x s windows, Lo-Fi heads on window-averaged keys/values (#223)
  twins.py      Twins-SVT locally-grouped (LSA) and global sub-sampled (GSA) attention (#109)
  area.py       YOLOv12 area attention: softmax inside l equal strips of the map (#232)
  combiner.py   Combiner-Fixed: direct in-block attention + block summaries, one softmax (#170)
  lsg.py        LSG: local blocks + sparse compressed tokens + global tokens, one softmax (#45)

Each module registers its mechanisms.
"""

from attnjax.ops.local.area import area_attention
from attnjax.ops.local.combiner import combiner_attention
from attnjax.ops.local.hilo import hilo_attention
from attnjax.ops.local.lsg import lsg_attention
from attnjax.ops.local.neighborhood import (dilated_neighborhood_attention,
                                            generalized_neighborhood_attention,
                                            neighborhood_attention, neighborhood_attention_rpb)
from attnjax.ops.local.twins import twins_gsa_attention, twins_lsa_attention
from attnjax.ops.local.window import (multi_scale_window_attention, swin_window_attention,
                                      window_attention)

__all__ = ["area_attention", "combiner_attention", "dilated_neighborhood_attention",
           "generalized_neighborhood_attention", "hilo_attention", "lsg_attention",
           "multi_scale_window_attention", "neighborhood_attention", "neighborhood_attention_rpb",
           "swin_window_attention", "twins_gsa_attention", "twins_lsa_attention", "window_attention"]
