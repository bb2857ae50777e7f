"""Analysis of attention in trained models.

  sinks.py  attention-sink statistics and length extrapolation of language models (read by probing
            each layer's mechanism with one-hot values), used by `experiments/sinks.py`.
"""

from attnjax.analysis import sinks

__all__ = ["sinks"]
