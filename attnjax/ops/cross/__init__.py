"""Cross-attention and alignment mechanisms between two sequences (encoder-decoder attention)."""

from attnjax.ops.cross import video_ccam  # noqa: F401
from attnjax.ops.cross import luong  # noqa: F401
