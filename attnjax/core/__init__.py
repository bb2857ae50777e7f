"""The primitives: masks, block masks, normalizers, flex attention, attention-state merge, KV cache."""
