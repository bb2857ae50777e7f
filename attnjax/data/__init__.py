"""Deterministic, resumable tasks: synthetic recall/copy/sort tasks, ListOps, and shipped data.

`make_task(config)` builds a task from a config whose `name` picks it and whose other fields
override the task's defaults (`default_config(name)` lists them). `task.batch(step, batch_size,
split=..., process_index=..., process_count=...)` is a pure function of the config (seed included),
the split, the step and the process, so a data iterator's state is its step number.

| name | kind | what |
| --- | --- | --- |
| mqar | lm | multi-query associative recall (Zoology, arXiv:2312.04927) |
| selective_copy | lm | selective copying (Mamba, arXiv:2312.00752) |
| induction | lm | induction heads (Mamba, arXiv:2312.00752) |
| sorting | lm | sort the tokens before a separator |
| listops | classify | ListOps (Nangia & Bowman, arXiv:1804.06028; LRA, arXiv:2011.04006) |
| digits | classify | sklearn's 8x8 handwritten digits, as images or pixel tokens |
| lm_bytes | lm | bytes of a local directory (default: the Python standard library) |
| textures | classify | find the odd texture patch (generated; needs channel and spatial selection) |

Graph tasks (`attnjax.data.graphs`: karate club, planted partition, DictionaryLookup) are arrays for
`attnjax.models.graph_net`, outside the sequence-task table.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Union

import ml_collections

from attnjax.data import graphs
from attnjax.data.base import SPLITS
from attnjax.data.base import Task
from attnjax.data.base import TaskSpec
from attnjax.data.base import make_rng
from attnjax.data.base import step_rng
from attnjax.data.listops import ListOps
from attnjax.data.shipped import Digits
from attnjax.data.shipped import LMBytes
from attnjax.data.synthetic import Induction
from attnjax.data.synthetic import MQAR
from attnjax.data.synthetic import SelectiveCopy
from attnjax.data.synthetic import Sorting
from attnjax.data.textures import Textures

TASKS = {
    cls.name: cls
    for cls in (MQAR, SelectiveCopy, Induction, Sorting, ListOps, Digits, LMBytes, Textures)
}


def _fields(name: str) -> dict[str, dataclasses.Field]:
  if name not in TASKS:
    raise ValueError(f"task config field `name`={name!r}: unknown task; known: {sorted(TASKS)}")
  return {f.name: f for f in dataclasses.fields(TASKS[name]) if f.init}


def default_config(name: str) -> ml_collections.ConfigDict:
  """The config of task `name` with every field at its default (a starting point to override)."""
  config = {"name": name}
  for field_name, field in _fields(name).items():
    config[field_name] = field.default
  return ml_collections.ConfigDict(config)


def make_task(config: Union[ml_collections.ConfigDict, Mapping[str, Any]]) -> Task:
  """Builds the task named by `config.name`; other fields override its defaults.

  Raises:
    ValueError naming the field: an unknown task name, a field the task does not have, or a bad
      value.
  """
  values = dict(config.to_dict() if hasattr(config, "to_dict") else config)
  name = values.pop("name", None)
  fields = _fields(name)
  unknown = sorted(set(values) - set(fields))
  if unknown:
    raise ValueError(f"task config field `{unknown[0]}`: task {name!r} has no such field; its "
                     f"fields are {sorted(fields)}")
  return TASKS[name](**values)


__all__ = [
    "Digits", "Induction", "LMBytes", "ListOps", "MQAR", "SPLITS", "SelectiveCopy", "Sorting",
    "TASKS", "Task", "TaskSpec", "Textures", "default_config", "graphs", "make_rng", "make_task",
    "step_rng",
]
