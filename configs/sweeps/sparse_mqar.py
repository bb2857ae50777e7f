"""Block-sparse attention on long-gap recall (issue: local and block-sparse attention): softmax,
sliding window, MoBA and NSA in the same 2-layer decoder at equal parameters, on MQAR whose queries
sit far from their keys.

  python -m experiments.sweep --config=configs/sweeps/sparse_mqar.py --workdir=/tmp/attnjax_sparse

MQAR (configs/mqar.py) with T = 128 and 16 key-value pairs, query gaps nearly uniform (power_a = 1:
a query is on average ~50 tokens after its key), width 64, 1000 steps of batch 64. The sparse
mechanisms see about a quarter of the context: sliding window 32; MoBA blocks of 16, top-2 (its own
block + 1 routed); NSA with compression blocks of 4 (stride 4) through an MLP of width 4 (so its
learned arrays keep it within the 10% parameter budget), 2 selected blocks of 16 and a window of 16.
Recall beyond the window needs the routed / selected blocks to find the key. The train loss, eval
loss and eval accuracy of each run are in docs/results.md.
"""

import ml_collections

MQAR = "configs/mqar.py:size=small"
SETTINGS = {"task.seq_len": 128, "task.num_kv_pairs": 16, "task.power_a": 1.0,
            "train.num_steps": 1000, "train.eval_every": 250, "train.checkpoint_every": 250}


def _run(name, mechanism, **kwargs):
  return {"name": name, "config": MQAR,
          "overrides": {"model.mechanism": mechanism, **SETTINGS,
                        **({"model.mechanism_kwargs": kwargs} if kwargs else {})}}


def get_config():
  config = ml_collections.ConfigDict()
  config.budget_tolerance = 0.1
  config.runs = [
      _run("softmax", "softmax"),
      _run("sliding_window_32", "sliding_window", window=32),
      _run("moba", "moba_attention", block_size=16, top_k=2),
      _run("nsa", "native_sparse_attention", compress_block=4, compress_stride=4, compress_hidden=4,
           select_block=16, num_selected=2, window=16),
  ]
  return config
