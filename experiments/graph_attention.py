r"""GAT, GATv2 and SuperGAT on node classification and on DictionaryLookup (issue 17).

  python -m experiments.graph_attention --lookup_k=4,8 --lookup_steps=1500

Node classification (`attnjax.models.graph_net.train_node_classifier`) on Zachary's karate club and
a noisy planted-partition graph (`attnjax.data.graphs`), each layer against the same network with
the edges removed (features alone); DictionaryLookup (Brody et al., arXiv:2105.14491) for each k,
where GAT's static attention cannot rank the keys per query and GATv2's can. Prints markdown tables;
docs/results.md records a run.
"""

import sys

from absl import app
from absl import flags

from attnjax.data import graphs
from attnjax.models import graph_net

_LAYERS = flags.DEFINE_list("layers", ["gat", "gatv2", "supergat"], "Graph attention layers.")
_STEPS = flags.DEFINE_integer("steps", 200, "Full-batch Adam steps for node classification.")
_LOOKUP_K = flags.DEFINE_list("lookup_k", ["4", "8"], "DictionaryLookup sizes k.")
_LOOKUP_STEPS = flags.DEFINE_integer("lookup_steps", 1500, "DictionaryLookup training steps.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the initialization and the data.")


def main(argv):
  del argv
  out = sys.stdout
  out.write("| graph | layer | train acc | test acc |\n| --- | --- | ---: | ---: |\n")
  for name, data in [("karate club", graphs.karate_club(seed=_SEED.value)),
                     ("planted partition", graphs.planted_partition(seed=_SEED.value))]:
    runs = [(layer, False) for layer in _LAYERS.value] + [(_LAYERS.value[-1], True)]
    for layer, alone in runs:
      r = graph_net.train_node_classifier(data, layer, steps=_STEPS.value, seed=_SEED.value,
                                          self_loops_only=alone)
      label = f"{layer}, edges removed" if alone else layer
      out.write(f"| {name} | {label} | {r['train_accuracy']:.3f} | {r['test_accuracy']:.3f} |\n")
  out.write("\n| DictionaryLookup k | layer | train acc | held-out acc |\n"
            "| ---: | --- | ---: | ---: |\n")
  for k in (int(x) for x in _LOOKUP_K.value):
    for layer in ("gat", "gatv2"):
      r = graph_net.train_dictionary_lookup(layer, k, steps=_LOOKUP_STEPS.value, seed=_SEED.value)
      out.write(f"| {k} | {layer} | {r['train_accuracy']:.3f} | {r['test_accuracy']:.3f} |\n")


if __name__ == "__main__":
  app.run(main)
