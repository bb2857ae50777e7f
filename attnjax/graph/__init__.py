"""Graph attention over edge lists: a segment softmax over each node's incoming edges and the layers
built on it, each a pure function of node features, `senders`, `receivers` (and edge features) with
explicit weights plus a Flax Linen class, registered in `attnjax.modules` (kind "graph").

  segment.py    segment_softmax, aggregate, add_self_loops, pad_graphs (jraph-style batches)
  gat.py        GAT and GATv2 (#144), PyTorch Geometric's weight layout and converters
  supergat.py   SuperGAT (#31): dot-product and mixed scores, the self-supervised edge loss
  relative_molecule.py   R-MAT (#106): atom-pair relation embeddings in the logits and values
  coulomb.py    CoulGAT (#46): attention on a (screened) Coulomb adjacency with per-node parameters
  latte.py      LATTE (#231): heterogeneous graphs as dense meta-relation adjacencies, attention per
                relation then over relations, higher orders composed layer by layer (a Linen model,
                not in the module registry: its input is a dict of typed nodes and relations)
"""

from attnjax.graph import coulomb
from attnjax.graph import gat
from attnjax.graph import latte
from attnjax.graph import relative_molecule
from attnjax.graph import segment
from attnjax.graph import supergat
from attnjax.graph.coulomb import CoulombGraphAttention, coulomb_graph_attention
from attnjax.graph.gat import GATConv, GATv2Conv, from_pyg, gat_layer, gatv2_layer, to_pyg
from attnjax.graph.latte import LATTE, join_relations, latte_layer, proximity_loss
from attnjax.graph.relative_molecule import (RelativeMoleculeAttention, bessel_basis,
                                             relative_molecule_attention)
from attnjax.graph.segment import GraphBatch, add_self_loops, aggregate, pad_graphs, segment_softmax
from attnjax.graph.supergat import (SuperGATConv, negative_edges, supergat_attention_loss,
                                    supergat_layer)

__all__ = ["CoulombGraphAttention", "GATConv", "GATv2Conv", "GraphBatch", "LATTE",
           "RelativeMoleculeAttention", "SuperGATConv", "add_self_loops", "aggregate", "bessel_basis",
           "coulomb", "coulomb_graph_attention", "from_pyg", "gat", "gat_layer", "gatv2_layer",
           "join_relations", "latte", "latte_layer", "negative_edges", "pad_graphs",
           "proximity_loss", "relative_molecule", "relative_molecule_attention", "segment",
           "segment_softmax", "supergat", "supergat_attention_loss", "supergat_layer", "to_pyg"]
