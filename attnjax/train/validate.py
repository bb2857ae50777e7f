"""Config checks run at the start of training, before anything is built or compiled.

A bad value stops the run at once with a ValueError that names the field (`model.num_heads`,
`mesh`, `workdir`, ...) instead of failing minutes later inside a compile or a sharded init.

Fields derived from the run length are left None in the configs and resolved here, at use time,
so that overriding `train.num_steps` alone rescales them (`resolve_config`):

  optimizer.warmup_steps   min(100, U // 10), U = num_steps // grad_accum_steps (the updates)
  train.eval_every         max(num_steps // 5, 1)   (5 evaluations a run)
  train.checkpoint_every   max(num_steps // 5, 1)   (5 saves a run; the last step always saves)

A value set explicitly (in the config or with `--config.train.eval_every=...`) is kept.
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Any

import jax
import ml_collections

from attnjax import models
from attnjax.parallel import mesh as mesh_lib
from attnjax.train import optim
from attnjax.train import regularizers
from attnjax.train import weight_methods

# Every mechanism name a model config uses (the models' parser of `layer_mechanisms`).
mechanism_names = models.mechanism_names


def derived_fields(config: ml_collections.ConfigDict) -> dict[tuple[str, str], int]:
  """(section, field) -> the value a None field takes, from `train.num_steps` (module docstring)."""
  num_steps = config.train.get("num_steps", None)
  if not isinstance(num_steps, int) or num_steps < 1:
    return {}  # _check_train names the bad num_steps
  accum = config.get("optimizer", {}).get("grad_accum_steps", 1) or 1
  updates = max(num_steps // accum, 1) if isinstance(accum, int) and accum >= 1 else num_steps
  return {("optimizer", "warmup_steps"): min(100, updates // 10),
          ("train", "eval_every"): max(num_steps // 5, 1),
          ("train", "checkpoint_every"): max(num_steps // 5, 1)}


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Sets each derived field that is None (module docstring) from `train.num_steps`, in place
  (a locked config keeps its lock); returns `config`. Fields set to a value are left alone."""
  if "train" not in config:
    return config
  for (section, field), value in derived_fields(config).items():
    if section in config and field in config[section] and config[section][field] is None:
      config[section][field] = value
  return config


def _check_model(model: ml_collections.ConfigDict):
  """The model's own schema (`attnjax.models.check_config`): one validator, one message for each
  mistake."""
  models.check_config(model)


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
  redraw = train.get("redraw_buffers_every", 0)
  if not isinstance(redraw, int) or redraw < 0:
    raise ValueError(f"train.redraw_buffers_every: must be an integer >= 0 (0: never), got "
                     f"{redraw!r}")
  if train.get("attention_regularizer", None) is not None:
    regularizers.check_config(train.attention_regularizer)
  if train.get("weight_method", None) is not None:
    weight_methods.check_config(train.weight_method)
  divisor = math.lcm(batch_shards, jax.process_count())
  if train.batch_size % divisor:
    raise ValueError(f"train.batch_size: {train.batch_size} is not divisible by the {batch_shards} "
                     f"batch shards (mesh data x fsdp) and {jax.process_count()} processes")


def check_workdir(workdir: Any, *, create: bool = False):
  """Checks that `workdir` is (or can be made) a writable directory, creating nothing unless
  `create`. With `create`, the directories it made are removed again if the write test fails; an
  existing workdir is left as it was.

  Raises:
    ValueError: naming `workdir`.
  """
  if not workdir or not isinstance(workdir, str):
    raise ValueError(f"workdir: a directory path is needed, got {workdir!r}")
  path = os.path.abspath(workdir)
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ValueError(f"workdir: {workdir!r} cannot be created: {existing!r} is not a directory")
  if not os.access(existing, os.W_OK | os.X_OK):
    where = "" if existing == path else f" (under {existing!r})"
    raise ValueError(f"workdir: {workdir!r} is not writable{where}")
  if not create:
    return
  made = []
  try:
    head = path
    while not os.path.exists(head):
      made.append(head)
      head = os.path.dirname(head)
    os.makedirs(path, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test"):
      pass
  except OSError as e:
    for directory in made:  # innermost first
      try:
        os.rmdir(directory)
      except OSError:
        pass
    raise ValueError(f"workdir: {workdir!r} cannot be written ({e.strerror or e})") from None


def check_config(config: ml_collections.ConfigDict) -> dict[str, int]:
  """Resolves the derived fields (`resolve_config`, in place) and checks every section; returns
  the resolved mesh shape. Touches no file and compiles nothing.

  Raises:
    ValueError: naming the bad field.
  """
  for section in ("task", "model", "optimizer", "train"):
    if section not in config:
      raise ValueError(f"config.{section}: missing section")
  resolve_config(config)
  _check_model(config.model)
  _check_optimizer(config.optimizer)
  shape = mesh_lib.mesh_shape(config.get("mesh", None), jax.device_count())
  _check_train(config.train, shape["data"] * shape["fsdp"])
  return shape


def validate_config(config: ml_collections.ConfigDict, workdir: str, *,
                    create_workdir: bool = True) -> dict[str, int]:
  """`check_config`, then `check_workdir`: the workdir is created (if missing) only when every
  check passed and `create_workdir`. Returns the resolved mesh shape. Compiles nothing.

  Raises:
    ValueError: naming the bad field.
  """
  shape = check_config(config)
  check_workdir(workdir, create=create_workdir)
  return shape
