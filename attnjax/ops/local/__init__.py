"""Local, window and neighborhood attention (family "local-window"): static structure as a `mask_mod`
over 1-D or N-D token positions (`attnjax.core.grid`), so `flex_attention`'s block skipping visits
only the tiles a window touches.

Each module below registers its mechanisms (or declares the rows it serves with
`attnjax.catalog.serves`).
"""

__all__: list[str] = []
