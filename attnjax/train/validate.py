"""Config checks run at the start of training, before anything is built or compiled.

A bad value stops the run at once with a ValueError that names the field (`model.num_heads`,
`mesh`, `workdir`, ...) instead of failing minutes later inside a compile or a sharded init.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from typing import Any

import jax
import ml_collections

from attnjax import registry
from attnjax.parallel import mesh as mesh_lib
from attnjax.train import optim

_SCHEDULE = re.compile(r"^\s*every\s+(\d+)\s*:\s*([A-Za-z0-9_]+)\s*$")
DTYPES = ("float32", "bfloat16")


def mechanism_names(model: ml_collections.ConfigDict) -> list[str]:
  """Every mechanism name a model config uses: `mechanism` and those of `layer_mechanisms` (a list
  of names, or a schedule string "every <n>: <name>")."""
  names = [model.get("mechanism", "softmax")]
  layers = model.get("layer_mechanisms", None)
  if isinstance(layers, str):
    match = _SCHEDULE.match(layers)
    if not match:
      raise ValueError(f"model.layer_mechanisms: {layers!r} is neither a list of mechanism names "
                       "nor a schedule like 'every 4: softmax'")
    if int(match.group(1)) < 1:
      raise ValueError(f"model.layer_mechanisms: the period in {layers!r} must be >= 1")
    names.append(match.group(2))
  elif layers:
    names.extend(layers)
    if len(layers) != model.get("depth", len(layers)):
      raise ValueError(f"model.layer_mechanisms: {len(layers)} names for depth {model.depth}")
  return names


def _check_model(model: ml_collections.ConfigDict):
  for name in mechanism_names(model):
    try:
      registry.get(name)
    except ValueError as e:
      raise ValueError(f"model.mechanism: {e}") from None
  for field in ("width", "depth", "num_heads", "mlp_dim"):
    value = model.get(field, None)
    if value is not None and (not isinstance(value, int) or value < 1):
      raise ValueError(f"model.{field}: must be a positive integer, got {value!r}")
  width, heads = model.get("width", None), model.get("num_heads", None)
  if width is not None and heads is not None and width % heads:
    raise ValueError(f"model.num_heads: {heads} heads do not divide model.width {width}")
  kv_heads = model.get("num_kv_heads", None)
  if kv_heads is not None and heads is not None and (kv_heads < 1 or heads % kv_heads):
    raise ValueError(f"model.num_kv_heads: {kv_heads} must divide model.num_heads {heads}")
  for field in ("dtype", "param_dtype"):
    value = model.get(field, "float32")
    if value not in DTYPES:
      raise ValueError(f"model.{field}: {value!r} is not one of {DTYPES}")


def _check_optimizer(opt: ml_collections.ConfigDict):
  if opt.get("name", "adamw") not in optim.OPTIMIZERS:
    raise ValueError(f"optimizer.name: unknown optimizer {opt.name!r}; known: {optim.OPTIMIZERS}")
  if opt.get("decay", "cosine") not in optim.DECAYS:
    raise ValueError(f"optimizer.decay: {opt.decay!r} is not one of {optim.DECAYS}")
  if not opt.get("learning_rate", 0) > 0:
    raise ValueError(f"optimizer.learning_rate: must be > 0, got {opt.get('learning_rate')!r}")
  if opt.get("warmup_steps", 0) < 0:
    raise ValueError(f"optimizer.warmup_steps: must be >= 0, got {opt.warmup_steps}")
  accum = opt.get("grad_accum_steps", 1)
  if accum is not None and (not isinstance(accum, int) or accum < 1):
    raise ValueError(f"optimizer.grad_accum_steps: must be >= 1, got {opt.grad_accum_steps}")
  for field in ("b1", "b2"):
    if not 0 <= opt.get(field, 0.9) < 1:
      raise ValueError(f"optimizer.{field}: must be in [0, 1), got {opt.get(field)}")


def _check_train(train: ml_collections.ConfigDict, batch_shards: int):
  for field in ("num_steps", "batch_size", "eval_every", "log_every", "checkpoint_every",
                "keep_checkpoints"):
    value = train.get(field, 1)
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"train.{field}: must be a positive integer, got {value!r}")
  if train.get("eval_batches", 1) < 0:
    raise ValueError(f"train.eval_batches: must be >= 0, got {train.eval_batches}")
  divisor = math.lcm(batch_shards, jax.process_count())
  if train.batch_size % divisor:
    raise ValueError(f"train.batch_size: {train.batch_size} is not divisible by the {batch_shards} "
                     f"batch shards (mesh data x fsdp) and {jax.process_count()} processes")


def _check_workdir(workdir: Any):
  if not workdir or not isinstance(workdir, str):
    raise ValueError(f"workdir: a directory path is needed, got {workdir!r}")
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_test"):
      pass
  except OSError as e:
    raise ValueError(f"workdir: {workdir!r} cannot be written ({e.strerror or e})") from None


def validate_config(config: ml_collections.ConfigDict, workdir: str) -> dict[str, int]:
  """Checks a training config; returns the resolved mesh shape. Compiles nothing.

  Raises:
    ValueError: naming the bad field.
  """
  for section in ("task", "model", "optimizer", "train"):
    if section not in config:
      raise ValueError(f"config.{section}: missing section")
  _check_model(config.model)
  _check_optimizer(config.optimizer)
  shape = mesh_lib.mesh_shape(config.get("mesh", None), jax.device_count())
  _check_train(config.train, shape["data"] * shape["fsdp"])
  _check_workdir(workdir)
  return shape
