"""Attention statistics of a pretrained encoder or of a trained run, written as files (the library
side of `experiments/analyze.py`, whose docstring lists the outputs).

  pretrained_maps(name)                 maps of a packaged encoder on the probe sentences, + probes
  run_maps(config, run_dir, examples)   maps of a run's latest checkpoint on held-out inputs
  analyze(weights, lengths, tokens, probes, workdir, max_offset)   stats.json / .md, PNG, head view
  to_markdown(stats)                    the per-layer table
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from attnjax.analysis import export, head_probes, statistics
from attnjax.analysis.capture import CAPTURE, from_state

__all__ = ["analyze", "pretrained_maps", "run_maps", "to_markdown"]


def pretrained_maps(name):
  """(weights [L, B, N, T, T], lengths, tokens of the first example, Clark et al.'s probes)."""
  from attnjax import pretrained  # pylint: disable=import-outside-toplevel
  from attnjax.pretrained.probe import PROBE_SENTENCES  # pylint: disable=import-outside-toplevel
  enc = pretrained.load(name)
  weights = enc.attention_maps(PROBE_SENTENCES)
  _, lengths = enc.tokenize(PROBE_SENTENCES)
  tokens = enc.tokenizer.encode(PROBE_SENTENCES[0]).tokens
  return weights, lengths, tokens, head_probes.probe_encoder(enc)


def run_maps(config, run_dir, examples):
  """(weights, lengths, tokens of the first example, None) of a trained run on held-out inputs."""
  from attnjax import data, models  # pylint: disable=import-outside-toplevel
  from attnjax.analysis import sinks  # pylint: disable=import-outside-toplevel
  from attnjax.train import trainer, validate, weight_methods  # pylint: disable=import-outside-toplevel
  validate.check_config(config)
  params, buffers = sinks.restore_params(run_dir)
  # A run trained with `train.weight_method` is read as the quantized / pruned model it evaluated
  # (at its last step: analysis reads finished runs).
  num_steps = int(config.train.num_steps)
  params = weight_methods.export(config.train.get("weight_method", None), params, num_steps,
                                 num_steps)
  task = data.make_task(config.task)
  model = models.build_model(trainer.model_config_for_run(config), task.spec)
  inputs = task.batch(0, examples, split="valid")["inputs"]
  variables = {"params": params, **({"buffers": buffers} if buffers else {})}
  # One compiled forward (capture's eager apply dispatches op by op).
  state = jax.jit(lambda v, x: model.apply(v, x, mutable=[CAPTURE])[1])(variables, inputs)
  return from_state(state).weights, None, [str(int(t)) for t in np.asarray(inputs)[0]], None


def to_markdown(stats) -> str:
  """The per-layer means of `analyze`'s stats (over heads) as a markdown table."""
  offsets = stats["offsets"]
  cols = ["layer", "entropy", "first-token share", "head diversity (JS)"] + [
      f"offset {o:+d}" for o in offsets]
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  columns = (stats["entropy"], stats["first_token_share"], stats["head_diversity"],
             stats["offset_profile"])
  for l, (ent, sink, div, prof) in enumerate(zip(*columns, strict=True)):
    profile = np.mean(prof, axis=0)
    cells = [str(l), f"{np.mean(ent):.3f}", f"{np.mean(sink):.3f}", f"{div:.3f}"]
    lines.append("| " + " | ".join(cells + [f"{p:.3f}" for p in profile]) + " |")
  return "\n".join(lines) + "\n"


def analyze(weights, lengths, tokens, probes, workdir, max_offset):
  """Writes the outputs (module docstring); returns the stats dict."""
  os.makedirs(workdir, exist_ok=True)
  stats = statistics.summary(weights, lengths, max_offset)
  if probes is not None:
    stats["probes"] = {"special": {k: v.tolist() for k, v in probes["special"].items()},
                       "relations": probes["relations"]}
  with open(os.path.join(workdir, "stats.json"), "w", encoding="utf-8") as f:
    json.dump(stats, f, indent=1)
  table = to_markdown(stats)
  with open(os.path.join(workdir, "stats.md"), "w", encoding="utf-8") as f:
    f.write(table)
  n = len(tokens) if lengths is None else int(lengths[0])
  first = np.asarray(weights)[:, 0, :, :n, :n]
  export.plot_grid(os.path.join(workdir, "maps.png"), first, tokens[:n])
  export.write_html(os.path.join(workdir, "head_view.html"), first, tokens[:n])
  return stats
