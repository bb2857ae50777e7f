"""Train a model on a task; resumes from the latest checkpoint in --workdir.

  python -m experiments.train --config=configs/mqar.py:mechanism=softmax,size=small \
      --workdir=/tmp/attnjax_mqar [--config.train.num_steps=3000 ...]

Writes checkpoints/, tensorboard/ and metrics.jsonl under the workdir; prints the final metrics.
Multi-host: set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (or pass the flags)
on every process.
"""

import json
import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 for jax.distributed (multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")
flags.mark_flags_as_required(["config", "workdir"])


def initialize_distributed():
  """jax.distributed.initialize from the flags (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
  JAX_PROCESS_ID); a no-op for a single process. Runs before attnjax is imported: importing it
  touches the backend, which jax.distributed.initialize must precede (so configs import nothing of
  attnjax, see configs/common.py)."""
  env = os.environ
  address = _COORDINATOR.value or env.get("JAX_COORDINATOR_ADDRESS")
  if not address or jax.distributed.is_initialized():
    return
  num = _NUM_PROCESSES.value or env.get("JAX_NUM_PROCESSES")
  pid = _PROCESS_ID.value if _PROCESS_ID.value is not None else env.get("JAX_PROCESS_ID")
  jax.distributed.initialize(coordinator_address=address,
                             num_processes=None if num is None else int(num),
                             process_id=None if pid is None else int(pid))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    # Library INFO logs (orbax's per-save lines) drown the progress bar; -v 0 brings them back.
    logging.set_verbosity(logging.WARNING)
  initialize_distributed()
  from attnjax.train import trainer  # pylint: disable=import-outside-toplevel
  result = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if jax.process_index() == 0:
    print(json.dumps(result, indent=1, sort_keys=True))


if __name__ == "__main__":
  app.run(main)
