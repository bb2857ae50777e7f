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

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from attnjax.analysis import report
from experiments import cli

_MODEL = flags.DEFINE_string("model", None, "A packaged pretrained encoder (attnjax.pretrained).")
_CONFIG = config_flags.DEFINE_config_file("config", None, "The run's train config.",
                                          lock_config=False)
_RUN_DIR = flags.DEFINE_string("run_dir", None, "The run's workdir (its checkpoints).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the outputs go.")
_EXAMPLES = flags.DEFINE_integer("examples", 8, "Held-out sequences of a run's task.")
_MAX_OFFSET = flags.DEFINE_integer("max_offset", 2, "Offset profile over -K..K.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]} (flags are --name=value)", "error")
  if (_MODEL.value is None) == (_CONFIG.value is None):
    cli.fail("give either --model or --config with --run_dir", "usage")
  if _MODEL.value is not None:
    found = report.pretrained_maps(_MODEL.value)
  else:
    if _RUN_DIR.value is None:
      cli.fail("--config needs --run_dir (the trained run's workdir)", "usage")
    found = report.run_maps(_CONFIG.value, _RUN_DIR.value, _EXAMPLES.value)
  stats = report.analyze(*found, _WORKDIR.value, _MAX_OFFSET.value)
  sys.stdout.write(report.to_markdown(stats))
  if "probes" in stats:
    for relation, best in stats["probes"]["relations"].items():
      sys.stdout.write(f"{relation}: layer {best['layer']} head {best['head']} "
                       f"{best['direction']} accuracy {best['accuracy']:.2f} "
                       f"(best offset {best['offset_baseline']:.2f})\n")


if __name__ == "__main__":
  app.run(main)
