"""Analysis of attention in trained models.

  capture.py  every attention layer's weights and logits from any project model's one forward
              (the layer sows them into the "attention_maps" collection when it is mutable)
  cab.py      CAB's attention-pattern matrix over the registry (#205)
  sinks.py    attention-sink statistics and length extrapolation of language models (read by
              probing each layer's mechanism with one-hot values), used by `experiments/sinks.py`.
  topology.py      edges, Betti numbers and the H0 barcode of thresholded maps (#104)
  export.py        JSON dict, self-contained HTML head view and PNG grid of maps (#193)
  logit_lens.py    value vectors and head outputs through an unembedding; the flow graph (#198)
  commonsense.py   maximum attention score for pronoun resolution (#74)
  graph_tokens.py  attention share on graph neighbours' tokens and the k-hop mask (#1)
  edatt.py         EDAtt's attention-based emission policy for simultaneous translation (#44)
  tame.py          T-TAME: a trained explanation head on a frozen CNN or ViT's features (#9)
  statistics.py    per-head entropy, key shares (sinks), offset profile, head distance / diversity
  head_probes.py   Clark et al.'s probes: special-token shares, most-attended-word accuracy per
                   dependency relation on a hand-labelled set, the attention-only probe (#128)
  dagcd.py         DAGCD: context attention of chosen heads boosts uncertain next-token choices (#72)
  damro.py         DAMRO: [CLS]-attention outlier patches and contrastive logits against them (#6)
  interventions.py  edits of the maps for edit_weights: VAR sink redistribution (#216), ACT
                   calibration (#217), MotionCLR column rescaling and map replacement (#19),
                   pattern injection (#90)
  additive_probe.py  additive attention in a bounded window and its offset profile (#186)
  report.py        all statistics of a pretrained encoder or a trained run, written as files
                   (experiments/analyze.py)

Each file is a namespace: `attnjax.analysis.topology.graph_features(...)`.
"""

from attnjax.analysis import additive_probe
from attnjax.analysis import cab
from attnjax.analysis import commonsense
from attnjax.analysis import dagcd
from attnjax.analysis import damro
from attnjax.analysis import edatt
from attnjax.analysis import export
from attnjax.analysis import graph_tokens
from attnjax.analysis import head_probes
from attnjax.analysis import interventions
from attnjax.analysis import logit_lens
from attnjax.analysis import report
from attnjax.analysis import sinks
from attnjax.analysis import statistics
from attnjax.analysis import tame
from attnjax.analysis import topology
# The function shadows its module's name here: `attnjax.analysis.capture(model, variables, x)`.
from attnjax.analysis.capture import CAPTURE, Captured, capture, from_state

__all__ = ["CAPTURE", "Captured", "additive_probe", "cab", "capture", "commonsense", "dagcd", "damro",
           "edatt", "export", "from_state", "graph_tokens", "head_probes", "interventions",
           "logit_lens", "report", "sinks", "statistics", "tame", "topology"]
