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
  mesh       data, fsdp, tensor, context: axis sizes (data -1: every device not used by the others)
  logical_axis_rules  None (attnjax.models.DEFAULT_LOGICAL_AXIS_RULES) or (logical, mesh) pairs

`optimizer.warmup_steps`, `train.eval_every` and `train.checkpoint_every` are None: they follow
`train.num_steps` at the start of the run (attnjax.train.validate.resolve_config: warm-up
min(100, steps // 10), eval and checkpoint 5 times a run), so `--config.train.num_steps=100` alone
gives a sensible schedule; set them to override. Fields that may be None (`model.num_kv_heads`,
`model.layer_mechanisms`, `model.rope_base`, ...) are typed placeholders, so
`--config.model.num_kv_heads=1` works on the command line. `python -m experiments.train
--config=configs/<task>.py --show_config` prints every field of a config.
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
    if default is None or isinstance(default, str):
      out[key] = value
      continue
    try:
      out[key] = type(default)(value)
    except ValueError:
      raise ValueError(f"config argument {key}={value!r}: expected {type(default).__name__} "
                       f"(e.g. {key}={default})") from None
  return out


def pick_size(sizes: Mapping[str, Mapping[str, Any]], size: str) -> Mapping[str, Any]:
  if size not in sizes:
    raise ValueError(f"config argument size={size!r}: known sizes {sorted(sizes)}")
  return sizes[size]


def base_config() -> ml_collections.ConfigDict:
  """Every training field at its default; a task config fills task and model. None fields are
  typed placeholders (overridable from the command line); the schedule fields follow num_steps."""
  placeholder = ml_collections.config_dict.placeholder
  config = ml_collections.ConfigDict()
  config.task = ml_collections.ConfigDict({"name": "mqar", "seed": 0})
  config.model = ml_collections.ConfigDict({
      "arch": "decoder_lm", "width": 64, "depth": 2, "num_heads": 2,
      "num_kv_heads": placeholder(int), "mlp_dim": 128, "mlp": "gelu", "norm": "rmsnorm",
      "mechanism": "softmax", "mechanism_kwargs": {},
      # A list of names or a schedule string "every <n>: <name>".
      "layer_mechanisms": placeholder(object), "rope_base": placeholder(float),
      "position_embedding": "learned", "tie_embeddings": False, "pooling": "mean",
      "dropout": 0.0, "dtype": "float32", "param_dtype": "float32"})
  config.optimizer = ml_collections.ConfigDict({
      "name": "adamw", "learning_rate": 1e-3, "warmup_steps": placeholder(int),
      "decay": "cosine", "weight_decay": 0.1, "b1": 0.9, "b2": 0.98, "eps": 1e-8,
      "clip_norm": 1.0, "grad_accum_steps": 1})
  config.train = ml_collections.ConfigDict({
      "num_steps": 1000, "batch_size": 64, "eval_batch_size": 256,
      "eval_every": placeholder(int), "eval_batches": 4, "log_every": 50,
      "checkpoint_every": placeholder(int), "keep_checkpoints": 2,
      "best_metric": "eval_accuracy", "seed": 0, "mixed_precision": False,
      "async_checkpoints": True,
      # Redraw fixed random arrays (the 'buffers', e.g. FAVOR+'s features) every n steps; 0: never.
      "redraw_buffers_every": 0})
  config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, "context": 1})
  config.logical_axis_rules = placeholder(tuple)
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
  """Steps, batch and peak rate. Warm-up (10%, at most 100 steps) and the eval and checkpoint
  cadence (5 times a run) stay None: they are derived from train.num_steps when the run starts,
  so they follow an override of num_steps."""
  config.optimizer.learning_rate = learning_rate
  config.train.num_steps = num_steps
  config.train.batch_size = batch_size
