"""Attention sinks and length extrapolation on byte-level language modelling (issue: softmax family):
softmax, softpick, ReLA, cog, FoX and selective attention, at equal parameters.

  python -m experiments.sweep --config=configs/sweeps/lm_bytes_sinks.py --workdir=/tmp/attnjax_sinks
  python -m experiments.sinks --config=configs/sweeps/lm_bytes_sinks.py --workdir=/tmp/attnjax_sinks

The standard library's `.py` files as bytes (configs/lm_bytes.py), T = 128, a 3-layer decoder of
width 64 with 4 heads, 1500 steps of batch 32. RoPE (base 10000) on every run but the RoPE-free ones:
FoX (its forget gates are its positions) and softmax without any position ("softmax_nope").
experiments.sinks then reports eval loss at T and 4T and the per-layer first-token attention share
and sink rate (results in docs/results.md).
"""

import ml_collections

LM = "configs/lm_bytes.py:size=small"
SETTINGS = {"task.seq_len": 128, "model.width": 64, "model.depth": 3, "model.num_heads": 4,
            "model.mlp_dim": 256, "train.num_steps": 1500, "train.batch_size": 32,
            "model.position_embedding": "none"}
ROPE = {"model.rope_base": 10000.0}


def _run(name, mechanism, rope=True, **overrides):
  return {"name": name, "config": LM,
          "overrides": {"model.mechanism": mechanism, **SETTINGS, **(ROPE if rope else {}),
                        **overrides}}


def get_config():
  config = ml_collections.ConfigDict()
  config.budget_tolerance = 0.1
  config.runs = [
      _run("softmax", "softmax"),
      _run("softmax_nope", "softmax", rope=False),
      _run("softpick", "softpick_attention"),
      _run("rela", "rectified_linear_attention"),
      _run("cog", "cog_attention"),
      _run("fox", "forgetting_attention", rope=False),
      _run("selective", "selective_attention_masking"),
  ]
  return config
