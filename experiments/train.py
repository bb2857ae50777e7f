r"""Train a model on a task; resumes from the latest checkpoint in --workdir.

  python -m experiments.train --config=configs/mqar.py:mechanism=softmax,size=small \
      --workdir=/tmp/attnjax_mqar [--config.train.num_steps=3000 ...]

Runs from any directory (a `configs/...` path not found there is read from the attnjax checkout or
installation). `--show_config` prints the config's fields, after the overrides and with the
fields derived from train.num_steps (warm-up, eval and checkpoint cadence) resolved, and exits.
The config, the task and the model are checked before the workdir is created: a configuration
error prints one line (`attnjax: config error: ...`), exits with status 2 and leaves no workdir.
Writes checkpoints/, tensorboard/ and metrics.jsonl under the workdir; prints the final metrics.
Multi-host: set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (or pass the flags)
on every process.
"""

import json
import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from experiments import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_SHOW_CONFIG = flags.DEFINE_bool("show_config", False,
                                 "Print the resolved config (every field) and exit.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 for jax.distributed (multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")
flags.mark_flags_as_required(["config"])


def initialize_distributed():
  """jax.distributed.initialize from the flags (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
  JAX_PROCESS_ID); a no-op for a single process. Runs before attnjax is imported: importing it
  touches the backend, which jax.distributed.initialize must precede (so configs import nothing of
  attnjax, see configs/common.py)."""
  import jax  # pylint: disable=import-outside-toplevel  (--help and flag errors skip it)
  env = os.environ
  address = _COORDINATOR.value or env.get("JAX_COORDINATOR_ADDRESS")
  if not address or jax.distributed.is_initialized():
    return
  num = _NUM_PROCESSES.value or env.get("JAX_NUM_PROCESSES")
  pid = _PROCESS_ID.value if _PROCESS_ID.value is not None else env.get("JAX_PROCESS_ID")
  jax.distributed.initialize(coordinator_address=address,
                             num_processes=None if num is None else int(num),
                             process_id=None if pid is None else int(pid))


def prepare(config, workdir: str):
  """Checks the config (resolving the fields derived from num_steps, in place), builds the task
  and the model and traces the model's init (shapes only, no compile); creates nothing on disk.
  A ValueError, the library's error for a bad config value, exits with one line (cli.fail).
  Returns (task, model) for trainer.train_and_evaluate."""
  # pylint: disable=import-outside-toplevel
  from attnjax import data
  from attnjax import models
  from attnjax.train import trainer
  from attnjax.train import validate
  try:
    validate.validate_config(config, workdir, create_workdir=False)
    task = data.make_task(config.task)
    model = models.build_model(trainer.model_config_for_run(config), task.spec)
    models.abstract_variables(model, task.spec)
  except ValueError as e:
    cli.fail(e)
  return task, model


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]} (flags are --name=value)", "error")
  config = _CONFIG.value
  if _SHOW_CONFIG.value:
    from attnjax.train import validate  # pylint: disable=import-outside-toplevel
    validate.resolve_config(config)
    print(config, end="")
    return
  if not _WORKDIR.value:
    cli.fail("--workdir is required (the directory for checkpoints and metrics)", "error")
  if not flags.FLAGS["verbosity"].present:
    # Library INFO logs (orbax's per-save lines) drown the progress bar; -v 0 brings them back.
    logging.set_verbosity(logging.WARNING)
  initialize_distributed()
  import jax  # pylint: disable=import-outside-toplevel
  from attnjax.train import trainer  # pylint: disable=import-outside-toplevel
  task, model = prepare(config, _WORKDIR.value)
  if jax.process_index() == 0:
    t = config.train
    print(f"attnjax: {t.num_steps} steps of batch {t.batch_size}; eval every {t.eval_every}, "
          f"checkpoint every {t.checkpoint_every}, warm-up {config.optimizer.warmup_steps} "
          "updates", flush=True)
  result = trainer.train_and_evaluate(config, _WORKDIR.value, task=task, model=model)
  if jax.process_index() == 0:
    print(json.dumps(result, indent=1, sort_keys=True))


def _default_fields():
  from configs import common  # pylint: disable=import-outside-toplevel
  return common.base_config()


if __name__ == "__main__":
  app.run(main, flags_parser=cli.make_flags_parser(
      default_fields=_default_fields,
      fields_note="every training config has these sections; override any field with "
                  "--config.<section>.<field>=<value>; warmup_steps, eval_every and "
                  "checkpoint_every left None follow train.num_steps; --config=<path> "
                  "--show_config prints a config's fields, overridden and resolved"))
