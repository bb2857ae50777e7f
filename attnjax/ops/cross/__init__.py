"""Cross-attention and alignment mechanisms between two sequences (encoder-decoder attention)."""
