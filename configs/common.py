"""Shared pieces of the experiment configs (configs/*.py): the default training fields and the
`"mechanism=<name>,size=<s>"` argument of `get_config(arg)`.

Imports nothing of attnjax: a config is loaded while flags are parsed, before
`jax.distributed.initialize`, and importing attnjax touches the JAX backend.

Every training config has the sections

  task       the data config (attnjax.data.make_task): name, seed and task fields
  model      the model config (attnjax.models.build_model)
  optimizer  name ("adamw"), learning_rate, warmup_steps, decay ("cosine" | "constant"),
             weight_decay, b1, b2, eps, clip_norm, grad_accum_steps
  train      num_steps, batch_size, eval_batch_size, eval_every, eval_batches, log_every,
             checkpoint_every, keep_checkpoints, best_metric, seed, mixed_precision,
             async_checkpoints
  mesh       axis -> size ({"data": -1}: every device on the data axis)
  logical_axis_rules  None (attnjax.models.DEFAULT_LOGICAL_AXIS_RULES) or (logical, mesh) pairs
"""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections


def parse_arg(arg: str, defaults: Mapping[str, Any]) -> dict[str, Any]:
  """Parses "key=value,key=value" over `defaults` (values keep the defaults' types).

  Raises:
    ValueError: an unknown key or a malformed item.
  """
  out = dict(defaults)
  for item in filter(None, (s.strip() for s in (arg or "").split(","))):
    if "=" not in item:
      raise ValueError(f"config argument {item!r}: expected key=value (keys: {sorted(defaults)})")
    key, value = (s.strip() for s in item.split("=", 1))
    if key not in defaults:
      raise ValueError(f"config argument {key!r}: unknown key; known: {sorted(defaults)}")
    default = defaults[key]
    out[key] = type(default)(value) if default is not None and not isinstance(default, str) \
        else value
  return out


def pick_size(sizes: Mapping[str, Mapping[str, Any]], size: str) -> Mapping[str, Any]:
  if size not in sizes:
    raise ValueError(f"config argument size={size!r}: known sizes {sorted(sizes)}")
  return sizes[size]


def base_config() -> ml_collections.ConfigDict:
  """Every training field at its default; a task config fills task and model."""
  config = ml_collections.ConfigDict()
  config.task = ml_collections.ConfigDict({"name": "mqar", "seed": 0})
  config.model = ml_collections.ConfigDict({
      "arch": "decoder_lm", "width": 64, "depth": 2, "num_heads": 2, "num_kv_heads": None,
      "mlp_dim": 128, "mlp": "gelu", "norm": "rmsnorm", "mechanism": "softmax",
      "mechanism_kwargs": {}, "layer_mechanisms": None, "rope_base": None,
      "position_embedding": "learned", "tie_embeddings": False, "pooling": "mean",
      "dropout": 0.0, "dtype": "float32", "param_dtype": "float32"})
  config.optimizer = ml_collections.ConfigDict({
      "name": "adamw", "learning_rate": 1e-3, "warmup_steps": 100, "decay": "cosine",
      "weight_decay": 0.1, "b1": 0.9, "b2": 0.98, "eps": 1e-8, "clip_norm": 1.0,
      "grad_accum_steps": 1})
  config.train = ml_collections.ConfigDict({
      "num_steps": 1000, "batch_size": 64, "eval_batch_size": 256, "eval_every": 250,
      "eval_batches": 4, "log_every": 50, "checkpoint_every": 250, "keep_checkpoints": 2,
      "best_metric": "eval_accuracy", "seed": 0, "mixed_precision": False,
      "async_checkpoints": True})
  config.mesh = ml_collections.ConfigDict({"data": -1})
  config.logical_axis_rules = ml_collections.config_dict.placeholder(tuple)
  return config


def set_model(config: ml_collections.ConfigDict, args: Mapping[str, Any], *, width: int,
              arch: str = "decoder_lm"):
  """Architecture, width (MLP 2·width), mechanism and (when `window` is given) its window."""
  config.model.arch = arch
  config.model.width = width
  config.model.mlp_dim = 2 * width
  config.model.mechanism = args["mechanism"]
  if args.get("window"):
    config.model.mechanism_kwargs = {"window": args["window"]}


def set_schedule(config: ml_collections.ConfigDict, *, num_steps: int, batch_size: int,
                 learning_rate: float):
  """Steps, batch and peak rate; warm-up 10% (at most 100 steps); eval and save 5 times a run."""
  config.optimizer.learning_rate = learning_rate
  config.optimizer.warmup_steps = min(100, num_steps // 10)
  config.train.num_steps = num_steps
  config.train.batch_size = batch_size
  config.train.eval_every = max(num_steps // 5, 1)
  config.train.checkpoint_every = max(num_steps // 5, 1)
