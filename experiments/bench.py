"""Attention benchmark: times and memory of attention implementations, side by side.

  python -m experiments.bench --config=configs/bench/flex.py[:demo] --workdir=DIR

Writes results.csv, results.md, time.png and memory.png under DIR and prints the markdown table.
A config with `benchmark = "decode"` (configs/bench/decode.py) runs the decode benchmark instead
(`attnjax.bench.decode`: results.csv and results.md).
Runs from any directory (a `configs/...` path not found there is read from the attnjax checkout);
`--help` lists the benchmark configs; a bad config argument or override prints one line.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from attnjax.bench import decode
from attnjax.bench import harness
from attnjax.bench import report
from experiments import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Benchmark config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the CSV, markdown and plots.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]} (flags are --name=value)", "error")
  if _CONFIG.value.get("benchmark") == "decode":
    print(decode.markdown(decode.run_benchmark(_CONFIG.value, _WORKDIR.value)))
    return
  results = harness.run_benchmark(_CONFIG.value, _WORKDIR.value)
  print(report.markdown(results, tflops=_CONFIG.value.get("report_tflops", False)))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.make_flags_parser(
      "bench", fields_note="override any with --config.<field>=<value>"))
