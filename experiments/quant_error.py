r"""Error statistics of quantized attention (SageAttention int8 with and without key smoothing,
SageAttention3 FP4 and its 8-bit SageBwd form) against full-precision softmax attention.

  python -m experiments.quant_error --config=configs/lm_bytes.py:mechanism=softmax,size=tiny \
      --workdir=/tmp/attnjax_quant_error [--out=docs/quantized_table.md]

Measures cosine similarity, relative L1 and RMSE on (a) N(0, 1) q, k, v (`--seq_len`, `--heads`,
`--head_dim`, `--batch`), (b) the same with an offset of 20 on 4 key channels, (c) the q, k, v of
every attention layer of the language model the config trains in `--workdir` (first; a finished
run there is reused) on `--rows` held-out windows. How: `attnjax.analysis.quant_error`. Prints the
table (and writes it to `--out` when given) with the machine it ran on.
"""

import json
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from experiments import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Language model config to train.",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the language model's training run.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Tokens of the random inputs.")
_HEADS = flags.DEFINE_integer("heads", 4, "Heads of the random inputs.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Head dim of the random inputs.")
_BATCH = flags.DEFINE_integer("batch", 2, "Batch rows of the random inputs.")
_ROWS = flags.DEFINE_integer("rows", 8, "Held-out windows fed to the trained model.")
_OUT = flags.DEFINE_string("out", None, "Also write the markdown table here.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]} (flags are --name=value)", "error")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)   # orbax's per-save INFO lines drown the table
  from attnjax.analysis import quant_error  # pylint: disable=import-outside-toplevel
  from attnjax.train import validate  # pylint: disable=import-outside-toplevel
  config = _CONFIG.value
  try:
    validate.check_config(config)
    result = quant_error.run(config, _WORKDIR.value, T=_SEQ_LEN.value, heads=_HEADS.value,
                             head_dim=_HEAD_DIM.value, batch=_BATCH.value, rows=_ROWS.value)
  except ValueError as e:
    cli.fail(e, "error")
  command = " ".join(["python -m experiments.quant_error"] + sys.argv[1:])
  table = quant_error.to_markdown(result["rows"])
  metrics = {key: result["train_metrics"][key] for key in ("eval_loss", "eval_accuracy", "step")
             if key in result["train_metrics"]}
  text = (f"`{command}`\n\nmachine: {result['machine']}\n\ntrained model: "
          f"{json.dumps(metrics)}\n\n{table}")
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      f.write(text)
  print("\n" + text, flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.make_flags_parser(
      fields_note="the language model config whose attention inputs to measure"))
