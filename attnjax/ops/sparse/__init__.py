"""Block-sparse and token-sparse attention chosen from the data (families "sparse-trainable" and
"sparse-inference"): selection by pooled block scores (`attnjax.core.sparse.select_blocks`) into a
traced `BlockMask` for `flex_attention`, or a token index set for decoding.

Each module below registers its mechanisms (or declares the rows it serves with
`attnjax.catalog.serves`).
"""

__all__: list[str] = []
