"""Run a list of (task, mechanism) training runs with equal parameter budgets and write a
leaderboard.

  python -m experiments.sweep --config=configs/sweeps/mqar_demo.py --workdir=/tmp/attnjax_demo

A sweep config (see configs/sweeps/mqar_demo.py) has
  runs              a list of {name, config ("configs/<task>.py[:arg]"), overrides {dotted.key: v}}
  budget_tolerance  the allowed relative distance of every run's parameter count from the first
                    run's (0.1: ±10%, as Long Range Arena asks, arXiv:2011.04006)
Every run's config is built and its model's parameters counted (abstractly) before anything trains;
a run outside the budget stops the sweep with the counts. Each run trains in `<workdir>/<name>`
(resuming from its checkpoints; a finished run, one with `result.json`, is skipped), then
`leaderboard.md`, `leaderboard.csv` and `leaderboard.png` (accuracy against decode-state size and
against training speed) are written to the workdir and the table is printed. Every run's config is
validated before the workdir is created; a configuration error (a bad config argument or override,
a run outside the budget) prints one line, `attnjax: config error: ...`, and exits with status 2.
Runs from any directory (`configs/...` paths not found there are read from the attnjax checkout).

Decode-state size is the number of floats one sequence keeps per layer to generate the next token
after T tokens, summed over layers, from the registry (`Mechanism.decode_state_floats`): the KV
cache T·K·(H + h) for attention over all keys, min(w, T)·K·(H + h) for a window w, the recurrent
state (e.g. N·H·h for Cottention) for linear attention.
"""

import csv
import json
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from experiments import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Sweep config file.", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the runs and the leaderboard.")
flags.mark_flags_as_required(["config", "workdir"])

RESULT = "result.json"
COLUMNS = ("name", "task", "mechanism", "params", "params_vs_first", "decode_state",
           "eval_accuracy", "eval_loss", "steps_per_sec", "tokens_per_sec", "train_seconds",
           "step")


def load_config(spec: str):
  """`path/to/config.py[:arg]` -> its `get_config(arg)`; a relative path not found from the current
  directory is read from the attnjax checkout (cli.load_config). ValueError when it cannot load."""
  return cli.load_config(spec)


# The dotted-key override of a run (shared with experiments.sinks, which measures a sweep's runs).
apply_overrides = cli.apply_overrides


def decode_state_size(model_config, seq_len: int) -> int:
  """Numbers of decode state per sequence, summed over layers: each layer's
  `Mechanism.decode_state_floats` (the KV cache, or the recurrent state) at T = seq_len."""
  from attnjax import models, registry  # pylint: disable=import-outside-toplevel
  if model_config.get("arch") == "cnn":
    return 0                                # a CNN classifier keeps no decode state
  width, heads = int(model_config.width), int(model_config.num_heads)
  kv_heads = int(model_config.get("num_kv_heads", None) or heads)
  head_dim = width // heads
  names = models.layer_mechanisms(model_config.mechanism, model_config.get("layer_mechanisms"),
                                  int(model_config.depth))
  kwargs = dict(model_config.get("mechanism_kwargs", None) or {})
  layer_kwargs = dict(model_config.get("layer_mechanism_kwargs", None) or {})
  total = 0
  for name in names:
    own = kwargs if name == model_config.mechanism else dict(layer_kwargs.get(name, {}))
    total += registry.get(name).decode_state_floats(seq_len, heads, kv_heads, head_dim, head_dim,
                                                    own)
  return total


def plan(sweep_config):
  """[(name, config, params, decode_state)] for every run, after each run's config is checked
  (validate.check_config, which also resolves the fields derived from num_steps) and the
  parameter-budget check. Touches no file.

  Raises:
    ValueError: naming the run and the field.
  """
  from attnjax import data, models  # pylint: disable=import-outside-toplevel
  from attnjax.train import trainer, validate  # pylint: disable=import-outside-toplevel
  runs = []
  for run in sweep_config.runs:
    try:
      config = apply_overrides(load_config(run["config"]), run.get("overrides", {}))
      validate.check_config(config)
      task = data.make_task(config.task)
      model = models.build_model(trainer.model_config_for_run(config), task.spec)
      params = models.param_count(models.abstract_variables(model, task.spec)["params"])
    except ValueError as e:
      raise ValueError(f"run {run['name']!r} ({run['config']}): {e}") from None
    runs.append((run["name"], config, params, decode_state_size(config.model, task.spec.seq_len)))
  first = runs[0][2]
  tolerance = float(sweep_config.get("budget_tolerance", 0.1))
  off = [(n, p) for n, _, p, _ in runs if abs(p - first) > tolerance * first]
  if off:
    raise ValueError(f"budget_tolerance: runs {off} are more than {tolerance:.0%} away from the "
                     f"{first:,} parameters of {runs[0][0]!r}; counts: "
                     f"{[(n, p) for n, _, p, _ in runs]}")
  return runs


def run_one(name, config, workdir):
  """Trains (or resumes) one run; returns its result (read back when the run had finished)."""
  from attnjax.train import trainer  # pylint: disable=import-outside-toplevel
  run_dir = os.path.join(workdir, name)
  path = os.path.join(run_dir, RESULT)
  if os.path.exists(path):
    with open(path) as f:
      result = json.load(f)
    if result.get("step") == int(config.train.num_steps):
      print(f"sweep: {name}: finished earlier, skipped", flush=True)
      return result
  print(f"sweep: {name}: training", flush=True)
  start = time.perf_counter()
  result = trainer.train_and_evaluate(config, run_dir)
  result["train_seconds"] = time.perf_counter() - start
  with open(path + ".tmp", "w") as f:
    json.dump(result, f, indent=1, sort_keys=True)
  os.replace(path + ".tmp", path)
  return result


def leaderboard_rows(runs, results):
  first = runs[0][2]
  rows = []
  for (name, config, params, state), result in zip(runs, results, strict=True):
    rows.append({
        "name": name, "task": config.task.name,
        # A CNN's row names its attention module (the model's `mechanism` field is unused there).
        "mechanism": ((config.model.get("attention_module") or "none")
                      if config.model.get("arch") == "cnn" else config.model.mechanism),
        "params": params, "params_vs_first": f"{(params - first) / first:+.1%}",
        "decode_state": state, "eval_accuracy": result.get("eval_accuracy", float("nan")),
        "eval_loss": result.get("eval_loss", float("nan")),
        "steps_per_sec": result.get("steps_per_sec", float("nan")),
        "tokens_per_sec": result.get("tokens_per_sec", float("nan")),
        "train_seconds": result.get("train_seconds", float("nan")), "step": result["step"]})
  return sorted(rows, key=lambda r: (r["task"], -r["eval_accuracy"]))


def _fmt(value):
  if isinstance(value, float):
    return f"{value:.4f}" if abs(value) < 10 else f"{value:,.0f}"
  if isinstance(value, int):
    return f"{value:,}"
  return str(value)


def to_markdown(rows) -> str:
  lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  lines += ["| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def write_plot(rows, path):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
  for ax, x, label in ((axes[0], "decode_state", "decode state (floats / sequence)"),
                       (axes[1], "tokens_per_sec", "training speed (tokens / s)")):
    for r in rows:
      ax.scatter(r[x], r["eval_accuracy"])
      ax.annotate(r["name"], (r[x], r["eval_accuracy"]), fontsize=8, xytext=(3, 3),
                  textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel(label)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("eval accuracy")
  fig.suptitle(", ".join(sorted({r["task"] for r in rows})))
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_leaderboard(rows, workdir, command: str) -> str:
  table = to_markdown(rows)
  with open(os.path.join(workdir, "leaderboard.md"), "w") as f:
    f.write(f"# Leaderboard\n\n`{command}`\n\n{table}")
  with open(os.path.join(workdir, "leaderboard.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
  write_plot(rows, os.path.join(workdir, "leaderboard.png"))
  return table


def run_sweep(sweep_config, workdir, command: str = "", runs=None) -> list[dict]:
  """Plans the runs (unless `runs`, plan's result, is given), then creates the workdir, trains
  each run and writes the leaderboard; returns its rows."""
  if runs is None:
    from attnjax.train import validate  # pylint: disable=import-outside-toplevel
    validate.check_workdir(workdir)
    runs = plan(sweep_config)
  os.makedirs(workdir, exist_ok=True)
  for name, _, params, _ in runs:
    print(f"sweep: {name}: {params:,} parameters ({(params - runs[0][2]) / runs[0][2]:+.1%} vs "
          f"{runs[0][0]})", flush=True)
  results = [run_one(name, config, workdir) for name, config, _, _ in runs]
  rows = leaderboard_rows(runs, results)
  table = write_leaderboard(rows, workdir, command)
  print("\n" + table, flush=True)
  print(f"sweep: leaderboard.md / .csv / .png in {workdir}", flush=True)
  return rows


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]} (flags are --name=value)", "error")
  if not flags.FLAGS["verbosity"].present:
    # Library INFO logs (orbax's per-save lines) drown the progress bar; -v 0 brings them back.
    logging.set_verbosity(logging.WARNING)
  from attnjax.train import validate  # pylint: disable=import-outside-toplevel
  try:
    validate.check_workdir(_WORKDIR.value)
    runs = plan(_CONFIG.value)
  except ValueError as e:
    cli.fail(e)
  command = " ".join(["python -m experiments.sweep"] + sys.argv[1:])
  run_sweep(_CONFIG.value, _WORKDIR.value, command, runs=runs)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.make_flags_parser(
      "sweeps", fields_note="runs is a list of {name, config, overrides}; override a field with "
      "--config.<field>=<value>"))
