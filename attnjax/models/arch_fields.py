"""The model config's fields that only one architecture reads, and the checks every part of the
schema shares (`attnjax.models.config.ModelConfig` calls these; a message names `model.<field>`).

  cnn        widths, blocks, attention_module, attention_kwargs, param_budget, width_multiple
  pervasive  source_len, growth_rate, kernel_size (with width = the embedding width D and depth = the
             DenseNet's layers: attnjax/models/pervasive.py)

A field of one architecture set on another is an error, so a config cannot carry a setting that
silently does nothing.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from attnjax.models import cnn

__all__ = ["DTYPES", "check_cnn_fields", "check_dropout_and_dtypes", "check_pervasive_fields",
           "choice", "positive_int"]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def positive_int(name: str, value: Any) -> int:
  """`value` as an int when it is a positive integer; a ValueError naming `model.<name>` else."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise ValueError(f"model.{name} must be a positive integer, got {value!r}")
  return int(value)


def choice(name: str, value: Any, choices: Sequence[str]) -> str:
  """`value` when it is one of `choices`; a ValueError naming `model.<name>` else."""
  if value not in choices:
    raise ValueError(f"model.{name} must be one of {tuple(choices)}, got {value!r}")
  return value


def check_dropout_and_dtypes(values: dict[str, Any]):
  """dropout in [0, 1) (normalized to float) and the two dtypes."""
  dropout = values["dropout"]
  if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
    raise ValueError(f"model.dropout must be in [0, 1), got {dropout!r}")
  values["dropout"] = float(dropout)
  choice("dtype", values["dtype"], tuple(DTYPES))
  choice("param_dtype", values["param_dtype"], tuple(DTYPES))


_CNN_FIELDS = ("widths", "blocks", "attention_module", "attention_kwargs", "param_budget")


def check_cnn_fields(values: dict[str, Any]):
  """The cnn fields (normalized in `values`); set on another arch, they are an error. For a cnn,
  also dropout and the dtypes, the other fields it reads."""
  if values["arch"] != "cnn":
    set_here = [n for n in _CNN_FIELDS if values[n] not in (None, {})]
    if set_here:
      raise ValueError(f"model.{set_here[0]} is a field of arch 'cnn', got arch "
                       f"{values['arch']!r}")
    return
  widths = (16, 32, 64) if values["widths"] is None else values["widths"]
  if (not isinstance(widths, (list, tuple)) or not widths
      or any(isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w <= 0
             for w in widths)):
    raise ValueError(f"model.widths must be a non-empty list of positive integers (channels per "
                     f"stage), got {widths!r}")
  blocks = (1,) * len(widths) if values["blocks"] is None else values["blocks"]
  if (not isinstance(blocks, (list, tuple)) or len(blocks) != len(widths)
      or any(isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b <= 0
             for b in blocks)):
    raise ValueError(f"model.blocks must give a positive number of blocks for each of the "
                     f"{len(widths)} stages of model.widths, got {blocks!r}")
  values["widths"], values["blocks"] = tuple(int(w) for w in widths), tuple(int(b) for b in blocks)
  name, kwargs = values["attention_module"], values["attention_kwargs"] or {}
  if not isinstance(kwargs, Mapping):
    raise ValueError(f"model.attention_kwargs must be a dict of the module's settings, got "
                     f"{kwargs!r}")
  if name is None:
    if kwargs:
      raise ValueError(f"model.attention_kwargs {dict(kwargs)} given without a "
                       "model.attention_module")
  else:
    if not isinstance(name, str):
      raise ValueError(f"model.attention_module must be None or a module name, got {name!r}")
    record = cnn.check_attention_module(name, where="model.attention_module")
    unknown = sorted(set(kwargs) - cnn.linen_settings(record))
    if unknown:
      raise ValueError(f"model.attention_kwargs: module {name!r} has no settings {unknown}; it "
                       f"takes {sorted(cnn.linen_settings(record))}")
  values["attention_kwargs"] = dict(kwargs)
  if values["param_budget"] is not None:
    values["param_budget"] = positive_int("param_budget", values["param_budget"])
  values["width_multiple"] = positive_int("width_multiple", values["width_multiple"])
  check_dropout_and_dtypes(values)


_PERVASIVE_FIELDS = ("source_len", "growth_rate", "kernel_size")


def check_pervasive_fields(values: dict[str, Any]):
  """The pervasive fields (normalized in `values`; growth_rate and kernel_size default to the paper's
  32 and 3); set on another arch, they are an error. For a pervasive model, also width, depth,
  tie_embeddings, dropout and the dtypes, the other fields it reads."""
  if values["arch"] != "pervasive":
    set_here = [n for n in _PERVASIVE_FIELDS if values[n] is not None]
    if set_here:
      raise ValueError(f"model.{set_here[0]} is a field of arch 'pervasive', got arch "
                       f"{values['arch']!r}")
    return
  if values["source_len"] is None:
    raise ValueError("model.source_len is required for arch 'pervasive': the source tokens at the "
                     "start of every input row")
  values["source_len"] = positive_int("source_len", values["source_len"])
  values["growth_rate"] = positive_int("growth_rate", 32 if values["growth_rate"] is None
                                       else values["growth_rate"])
  k = positive_int("kernel_size", 3 if values["kernel_size"] is None else values["kernel_size"])
  if k % 2 == 0:
    raise ValueError(f"model.kernel_size must be odd (a centred, target-masked kernel), got {k}")
  values["kernel_size"] = k
  for name in ("width", "depth"):
    values[name] = positive_int(name, values[name])
  if not isinstance(values["tie_embeddings"], bool):
    raise ValueError(f"model.tie_embeddings must be a bool, got {values['tie_embeddings']!r}")
  check_dropout_and_dtypes(values)
