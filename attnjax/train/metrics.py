"""Metric writers: TensorBoard event files and `metrics.jsonl` in the workdir, and a console
progress bar with steps/s and tokens/s.

Only process 0 writes. On resume from step s the JSONL log is cut back to the records of steps <= s,
so the log of a resumed run is the log of an uninterrupted one (timing fields aside).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping, Optional

import jax
import tqdm

JSONL = "metrics.jsonl"


def _scalar(v: Any) -> float:
  return float(jax.device_get(v))


def read_jsonl(workdir: str) -> list[dict[str, Any]]:
  """The records of `<workdir>/metrics.jsonl`, in order."""
  path = os.path.join(workdir, JSONL)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class MetricWriter:
  """Writes scalars to TensorBoard (tensorboardX) and one JSON record per call to metrics.jsonl."""

  def __init__(self, workdir: str, *, resume_step: Optional[int] = None, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, JSONL)
    self._tb = None
    if not enabled:
      return
    if resume_step is not None:
      self._truncate(resume_step)
    elif os.path.exists(self.path):
      os.remove(self.path)  # a fresh run (no checkpoint) starts a fresh log
    # Import here: tensorboardX pulls in protobuf, which only the writing process needs.
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    self._tb = SummaryWriter(logdir=os.path.join(workdir, "tensorboard"))

  def _truncate(self, step: int):
    records = [r for r in read_jsonl(os.path.dirname(self.path)) if r.get("step", 0) <= step]
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      for r in records:
        f.write(json.dumps(r) + "\n")
    os.replace(tmp, self.path)

  def write(self, step: int, scalars: Mapping[str, Any]):
    if not self.enabled:
      return
    values = {k: _scalar(v) for k, v in scalars.items()}
    for k, v in values.items():
      self._tb.add_scalar(k, v, step)
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), **values}) + "\n")

  def write_text(self, tag: str, text: str, step: int = 0):
    if self.enabled:
      self._tb.add_text(tag, text, step)

  def flush(self):
    if self._tb is not None:
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()
      self._tb = None


class Progress:
  """A tqdm bar over train steps showing loss, steps/s and tokens/s (process 0 only)."""

  def __init__(self, *, start: int, total: int, tokens_per_step: int, enabled: bool = True):
    self.tokens_per_step = tokens_per_step
    self._bar = tqdm.tqdm(total=total, initial=start, disable=not enabled, unit="step",
                          dynamic_ncols=True, smoothing=0.1)
    self._last_step, self._last_time = start, None

  def rates(self, step: int) -> dict[str, float]:
    """steps/s and tokens/s since the previous call (empty on the first call: compile time)."""
    now = time.perf_counter()
    out = {}
    if self._last_time is not None and step > self._last_step:
      steps_per_sec = (step - self._last_step) / (now - self._last_time)
      out = {"steps_per_sec": steps_per_sec, "tokens_per_sec": steps_per_sec * self.tokens_per_step}
    self._last_step, self._last_time = step, now
    return out

  def update(self, step: int, postfix: Optional[Mapping[str, float]] = None):
    self._bar.update(step - self._bar.n)
    if postfix:
      self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

  def close(self):
    self._bar.close()
