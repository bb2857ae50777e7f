"""Cross-attention modules that do not fit the sequence mechanisms' single q, k, v contract (a
learned latent array, several outputs, modality-specific inputs), each a pure function of its
inputs and weights plus a Flax Linen class, registered in `attnjax.modules`. Cross-attention that
fits the contract lives with the mechanisms (`attnjax.ops.cross`).

  perceiver.py   Perceiver (#171): latents cross-attend to a long input array, shared weights
"""

from attnjax.cross import perceiver
from attnjax.cross.perceiver import Perceiver, fourier_features, perceiver_block

__all__ = ["Perceiver", "fourier_features", "perceiver", "perceiver_block"]
