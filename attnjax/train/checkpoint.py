"""Checkpoints of a training run with orbax: async saves, keep-last-N plus best, resume, atomicity.

A checkpoint at step s holds the train state (params, optimizer state, step, RNG) as one item and a
small JSON item with the data-iterator position (the next batch index, = s, since batches are a pure
function of the step) and the metrics it was saved with. orbax writes each save into a temporary
directory and renames it only once complete (atomic finalisation), so a process killed mid-save
leaves no checkpoint that `latest_step()` would pick; the temporary directories are removed when the
next manager opens the workdir (`cleanup_tmp_directories`).

Kept: the latest `keep` checkpoints and the best one by `best_metric` (when given), both at once
(orbax preservation policies LatestN | BestN).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_managers

STATE = "state"
META = "meta"


def metric_mode(best_metric: str) -> str:
  """"min" for losses and errors, "max" for everything else (accuracy)."""
  return "min" if any(w in best_metric for w in ("loss", "error", "perplexity")) else "max"


class Checkpointer:
  """An orbax CheckpointManager over `<workdir>/checkpoints` for a train-state pytree."""

  def __init__(self, workdir: str, *, keep: int = 3, best_metric: Optional[str] = None,
               async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.best_metric = best_metric or None
    policies = [ocp_managers.LatestN(n=max(int(keep), 1))]
    if self.best_metric:
      name = self.best_metric
      # BestN sorts ascending (reversed when `reverse`) and keeps the last n.
      policies.append(ocp_managers.BestN(
          get_metric_fn=lambda m: float(m[name]), reverse=metric_mode(name) == "min", n=1,
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=(STATE, META))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def best_step(self) -> Optional[int]:
    return self.manager.best_step() if self.best_metric else None

  def save(self, step: int, state: Any, *, metrics: Optional[dict[str, float]] = None) -> bool:
    """Starts an (async) save of `state` at `step`; `metrics` (with `best_metric`) rank it."""
    if metrics is not None and self.best_metric not in metrics:
      metrics = None
    meta = {"step": int(step), "data_position": int(step),
            "metrics": {k: float(v) for k, v in (metrics or {}).items()}}
    return self.manager.save(
        int(step), args=ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                               META: ocp.args.JsonSave(meta)}),
        metrics=metrics, force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Restores step `step` into the shapes, dtypes and shardings of `abstract_state`
    (a tree of `jax.ShapeDtypeStruct` with `.sharding`). Returns (state, meta)."""
    restored = self.manager.restore(
        int(step), args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract_state),
                                               META: ocp.args.JsonRestore()}))
    return restored[STATE], dict(restored[META])

  def wait_until_finished(self):
    self.manager.wait_until_finished()

  def close(self):
    """Waits for the save in flight and releases the manager (idempotent)."""
    if self.manager is not None:
      self.manager.wait_until_finished()
      self.manager.close()
      self.manager = None


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` carrying `shardings` (the restore target)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
