r"""Attention statistics of a pretrained encoder or of a trained run.

  python -m experiments.analyze --model=all-MiniLM-L6-v2 --workdir=/tmp/attnjax_analyze
  python -m experiments.train --config=configs/lm_bytes.py:size=tiny --workdir=/tmp/attnjax_lm
  python -m experiments.analyze --config=configs/lm_bytes.py:size=tiny --run_dir=/tmp/attnjax_lm \
      --workdir=/tmp/attnjax_analyze_lm

Captures every layer's post-softmax maps in one forward (`attnjax.analysis.capture`): of the
packaged encoder on the fixed sentences of `attnjax.pretrained.probe` (`--model`), or of a run's
latest checkpoint on a held-out batch of its task (`--config` + `--run_dir`). Writes to --workdir:

  stats.json     per layer and head: entropy, first-token share, offset profile; per layer: head
                 diversity (`attnjax.analysis.statistics.summary`); for `--model` also Clark et al.'s
                 probes (`attnjax.analysis.head_probes.probe_encoder`: [CLS]/[SEP]/punctuation shares,
                 the best head per dependency relation against the best fixed offset)
  stats.md       the per-layer means as a table (also printed)
  maps.png       the first example's maps, layers x heads (`attnjax.analysis.export.plot_grid`)
  head_view.html the first example's interactive head view (`attnjax.analysis.export.write_html`)
"""

import json
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags
import jax
import numpy as np

from attnjax.analysis import CAPTURE, export, from_state, head_probes, statistics
from experiments import cli

_MODEL = flags.DEFINE_string("model", None, "A packaged pretrained encoder (attnjax.pretrained).")
_CONFIG = config_flags.DEFINE_config_file("config", None, "The run's train config.",
                                          lock_config=False)
_RUN_DIR = flags.DEFINE_string("run_dir", None, "The run's workdir (its checkpoints).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the outputs go.")
_EXAMPLES = flags.DEFINE_integer("examples", 8, "Held-out sequences of a run's task.")
_MAX_OFFSET = flags.DEFINE_integer("max_offset", 2, "Offset profile over -K..K.")
flags.mark_flags_as_required(["workdir"])


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
  from attnjax.train import trainer, validate  # pylint: disable=import-outside-toplevel
  validate.check_config(config)
  params, buffers = sinks.restore_params(run_dir)
  task = data.make_task(config.task)
  model = models.build_model(trainer.model_config_for_run(config), task.spec)
  inputs = task.batch(0, examples, split="valid")["inputs"]
  variables = {"params": params, **({"buffers": buffers} if buffers else {})}
  # One compiled forward (capture's eager apply dispatches op by op).
  state = jax.jit(lambda v, x: model.apply(v, x, mutable=[CAPTURE])[1])(variables, inputs)
  return from_state(state).weights, None, [str(int(t)) for t in np.asarray(inputs)[0]], None


def to_markdown(stats) -> str:
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


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]} (flags are --name=value)", "error")
  if (_MODEL.value is None) == (_CONFIG.value is None):
    cli.fail("give either --model or --config with --run_dir", "usage")
  if _MODEL.value is not None:
    found = pretrained_maps(_MODEL.value)
  else:
    if _RUN_DIR.value is None:
      cli.fail("--config needs --run_dir (the trained run's workdir)", "usage")
    found = run_maps(_CONFIG.value, _RUN_DIR.value, _EXAMPLES.value)
  stats = analyze(*found, _WORKDIR.value, _MAX_OFFSET.value)
  sys.stdout.write(to_markdown(stats))
  if "probes" in stats:
    for relation, best in stats["probes"]["relations"].items():
      sys.stdout.write(f"{relation}: layer {best['layer']} head {best['head']} "
                       f"{best['direction']} accuracy {best['accuracy']:.2f} "
                       f"(best offset {best['offset_baseline']:.2f})\n")


if __name__ == "__main__":
  app.run(main)
