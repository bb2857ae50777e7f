r"""Attention sinks and length extrapolation of the language models of a sweep.

  python -m experiments.sweep --config=configs/sweeps/lm_bytes_sinks.py --workdir=/tmp/attnjax_sinks
  python -m experiments.sinks --config=configs/sweeps/lm_bytes_sinks.py --workdir=/tmp/attnjax_sinks

For every run of the sweep (trained in `<workdir>/<name>` by experiments.sweep), restores the
parameters of its latest checkpoint and measures on `--batches` batches of held-out windows:

  eval_loss      next-token loss (nats per token) at the training length T;
  loss_<k>x      the same at k·T (`--length_factors`; the same files, longer windows);
  sink_share     per layer, the mean weight on the window's first token, over heads, batch rows
                 and the queries t >= 1 (query 0 sees nothing else);
  sink_rate      per layer, the share of heads whose mean first-token weight exceeds 0.3 (the
                 attention-sink metric of Gu et al., "When Attention Sink Emerges in Language
                 Models", arXiv:2410.10781, that the softpick paper reports).

How the weights are read (probing each layer's own mechanism with one-hot values, and why that is
exact): `attnjax.analysis.sinks`. The table goes to `<workdir>/sinks.md` and stdout.
"""

import json
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from attnjax.analysis import sinks
from experiments import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Sweep config file.", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "The sweep's workdir (runs trained there).")
_BATCHES = flags.DEFINE_integer("batches", 4, "Held-out batches per measurement.")
_FACTORS = flags.DEFINE_list("length_factors", ["4"], "Evaluate at these multiples of T.")
flags.mark_flags_as_required(["config", "workdir"])

def to_markdown(rows, factors) -> str:
  cols = ["name", "mechanism", "eval_loss"] + [f"loss_{f}x" for f in factors] + [
      "sink_share per layer", "sink_rate per layer"]
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for r in rows:
    cells = [r["name"], r["mechanism"], f"{r['eval_loss']:.4f}"]
    cells += [f"{r[f'loss_{f}x']:.4f}" for f in factors]
    cells += [" / ".join(f"{s:.3f}" for s in r["sink_share"]),
              " / ".join(f"{s:.2f}" for s in r["sink_rate"])]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]} (flags are --name=value)", "error")
  rows = []
  for run in _CONFIG.value.runs:
    config = cli.apply_overrides(cli.load_config(run["config"]), run.get("overrides", {}))
    from attnjax.train import validate  # pylint: disable=import-outside-toplevel
    validate.check_config(config)
    try:
      result = sinks.evaluate(config, os.path.join(_WORKDIR.value, run["name"]),
                        batches=_BATCHES.value, factors=_FACTORS.value)
    except ValueError as e:
      cli.fail(e, "error")
    rows.append({"name": run["name"], "mechanism": config.model.mechanism, **result})
    print(f"sinks: {run['name']}: {json.dumps(result)}", flush=True)
  table = to_markdown(rows, _FACTORS.value)
  command = " ".join(["python -m experiments.sinks"] + sys.argv[1:])
  with open(os.path.join(_WORKDIR.value, "sinks.md"), "w") as f:
    f.write(f"# Sinks and length extrapolation\n\n`{command}`\n\n{table}")
  print("\n" + table, flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.make_flags_parser(
      "sweeps", fields_note="the sweep config whose runs to measure"))
