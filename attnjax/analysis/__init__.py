"""Analysis of attention in trained models.

  capture.py  every attention layer's weights and logits from any project model's one forward
              (the layer sows them into the "attention_maps" collection when it is mutable)
  cab.py      CAB's attention-pattern matrix over the registry (#205)
  sinks.py  attention-sink statistics and length extrapolation of language models (read by probing
            each layer's mechanism with one-hot values), used by `experiments/sinks.py`.
"""

from attnjax.analysis import cab
from attnjax.analysis import sinks
# The function shadows its module's name here: `attnjax.analysis.capture(model, variables, x)`.
from attnjax.analysis.capture import CAPTURE, Captured, capture, from_state

__all__ = ["CAPTURE", "Captured", "cab", "capture", "from_state", "sinks"]
