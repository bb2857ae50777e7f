"""Benchmark entry point: parses flags and runs `attnjax.bench.harness`.

    python -m experiments.bench --config=configs/bench/flex.py[:demo] --workdir=DIR [--config.x=y]
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from attnjax.bench import harness

_CONFIG = config_flags.DEFINE_config_file("config", None, "Benchmark config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where results.{csv,md,png} are written.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  rows = harness.run(_CONFIG.value, _WORKDIR.value)
  print()
  print(harness.markdown(rows))
  print(f"Results written to {_WORKDIR.value}/results.{{csv,md,png}}")


if __name__ == "__main__":
  app.run(main)
