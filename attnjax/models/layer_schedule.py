"""Per-layer model settings, kept out of the config schema's file: the schedules that give each
layer its mechanism (`layer_mechanisms`) and whether it applies RoPE (`layer_rope`), read from a
list or a string "every K: name", and the check of the keyword arguments a config gives a
mechanism. Errors name the `model.<field>` they come from.
"""

from __future__ import annotations

import inspect
import re
from typing import Any, Mapping, Optional

import numpy as np

from attnjax import registry

__all__ = ["check_mechanism_kwargs", "layer_mechanisms", "layer_rope", "mechanism_record",
           "parse_schedule"]

# Arguments that the layer passes to every mechanism: not settable through mechanism_kwargs.
_RESERVED = frozenset({"causal", "cross", "segment_ids", "q_offset", "kv_lengths", "scale",
                       "implementation"})
_SCHEDULE = re.compile(r"^\s*every\s+(\d+)\s*:\s*([A-Za-z0-9_]+)\s*$")


def layer_rope(schedule: Any, depth: int) -> Optional[tuple[bool, ...]]:
  """Per layer, whether it applies RoPE, from `layer_rope` (None, a list of bools, or "every K:
  nope" / "every K: rope"); None when every layer does."""
  if schedule is None or schedule == "":
    return None
  if isinstance(schedule, str):
    match = _SCHEDULE.match(schedule)
    if not match or int(match.group(1)) < 1 or match.group(2) not in ("rope", "nope"):
      raise ValueError(f"model.layer_rope: a schedule string must read 'every K: nope' or 'every K: "
                       f"rope' with K >= 1, got {schedule!r}")
    every, marked = int(match.group(1)), match.group(2) == "rope"
    return tuple(marked if i % every == every - 1 else not marked for i in range(depth))
  if isinstance(schedule, (list, tuple)):
    if len(schedule) != depth or not all(isinstance(x, (bool, np.bool_)) for x in schedule):
      raise ValueError(f"model.layer_rope must give one bool per layer (depth {depth}), got "
                       f"{schedule!r}")
    return tuple(bool(x) for x in schedule)
  raise ValueError(f"model.layer_rope must be None, a list of bools or 'every K: nope', got "
                   f"{schedule!r}")


def mechanism_record(where: str, name: str) -> registry.Mechanism:
  """The registry record of `name`; an unknown name is an error prefixed by `where`."""
  try:
    return registry.get(name)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None


def parse_schedule(text: str) -> tuple[int, str]:
  """(K, name) of a schedule string "every K: name"."""
  match = _SCHEDULE.match(text)
  if not match or int(match.group(1)) < 1:
    raise ValueError(f"model.layer_mechanisms: a schedule string must read 'every K: name' with "
                     f"K >= 1, got {text!r}")
  return int(match.group(1)), match.group(2)


def layer_mechanisms(mechanism: str, schedule: Any, depth: int) -> tuple[str, ...]:
  """One mechanism name per layer from `layer_mechanisms` (None, a list, or "every K: name")."""
  if schedule is None or schedule == "":
    return (mechanism,) * depth
  if isinstance(schedule, str):
    every, name = parse_schedule(schedule)
    return tuple(name if i % every == every - 1 else mechanism for i in range(depth))
  if isinstance(schedule, (list, tuple)):
    if len(schedule) != depth or not all(isinstance(n, str) for n in schedule):
      raise ValueError(f"model.layer_mechanisms must name one mechanism per layer (depth {depth}), "
                       f"got {schedule!r}")
    return tuple(schedule)
  raise ValueError(f"model.layer_mechanisms must be None, a list of names or 'every K: name', "
                   f"got {schedule!r}")


def check_mechanism_kwargs(where: str, mech: registry.Mechanism, kwargs: Mapping[str, Any]):
  """Keyword arguments the mechanism's function accepts, and every required one present."""
  if not isinstance(kwargs, Mapping):
    raise ValueError(f"{where} must be a dict of keyword arguments, got {kwargs!r}")
  given = [t.name for t in mech.token_inputs if t.kind == "given"]
  if given:
    raise ValueError(f"{where}: mechanism {mech.name!r} needs per-token data {given} that the "
                     "models built from config do not supply; call attnjax.nn.MultiHeadAttention "
                     "with it instead")
  layer_set = {p.name for p in mech.params} | {t.name for t in mech.token_inputs}
  reserved = sorted(set(kwargs) & (_RESERVED | layer_set))
  if reserved:
    raise ValueError(f"{where}: {reserved} are set by the layer, not by config, for mechanism "
                     f"{mech.name!r}")
  params = inspect.signature(mech.fn).parameters
  if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
      accepted = sorted(set(params) - _RESERVED - {"q", "k", "v"} - layer_set)
      raise ValueError(f"{where}: mechanism {mech.name!r} takes no arguments {unknown}; it accepts "
                       f"{accepted}")
  missing = sorted(n for n, p in params.items()
                   if p.kind == p.KEYWORD_ONLY and p.default is p.empty and n not in kwargs
                   and n not in mech.defaults and n not in layer_set)
  if missing:
    raise ValueError(f"{where}: mechanism {mech.name!r} needs the arguments {missing}")
