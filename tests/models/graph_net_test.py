"""Graph attention networks on the shipped graph tasks: DictionaryLookup (arXiv:2105.14491) is
solved by GATv2 and not by GAT, whose attention ranks the keys the same way for every query; on a
noisy planted partition, attention over the edges beats the same network on the features alone;
the tasks are what they say (labels match the lookup, both edge directions)."""

import numpy as np
import pytest

from attnjax.data import graphs
from attnjax.models import graph_net


def test_dictionary_lookup_instances():
  b = graphs.dictionary_lookup(np.random.default_rng(0), 5, 3)
  nodes, labels = b["nodes"], b["labels"]
  for n in range(3):
    for i in range(5):   # query i's attribute -> the key with that attribute -> its value
      attr = np.argmax(nodes[n, 5 + i, :5])
      key = [j for j in range(5) if np.argmax(nodes[n, j, :5]) == attr][0]
      assert labels[n, i] == np.argmax(nodes[n, key, 5:])
  s, r = graphs.dictionary_lookup_graph(5)
  assert len(s) == 25 and set(s) == set(range(5)) and set(r) == set(range(5, 10))


def test_gatv2_solves_dictionary_lookup_and_gat_does_not():
  v2 = graph_net.train_dictionary_lookup("gatv2", 4, steps=300, batch=32, eval_instances=128)
  v1 = graph_net.train_dictionary_lookup("gat", 4, steps=300, batch=32, eval_instances=128)
  assert v2["test_accuracy"] > 0.95 and v1["test_accuracy"] < 0.6, (v1, v2)


def test_attention_over_edges_beats_features_alone():
  data = graphs.planted_partition()
  s, r = data["senders"], data["receivers"]
  assert set(zip(s.tolist(), r.tolist(), strict=True)) == set(zip(r.tolist(), s.tolist(),
                                                                   strict=True))
  with_edges = graph_net.train_node_classifier(data, "gatv2", steps=100)
  alone = graph_net.train_node_classifier(data, "gatv2", steps=100, self_loops_only=True)
  assert with_edges["test_accuracy"] > alone["test_accuracy"] + 0.3, (with_edges, alone)


def test_unknown_layer_is_an_error():
  with pytest.raises(ValueError, match="layer must be one of"):
    graph_net.train_node_classifier(graphs.karate_club(), "gcn", steps=1)
