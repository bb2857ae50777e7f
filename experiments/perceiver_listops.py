r"""The Perceiver against a transformer encoder on ListOps: accuracy, and cost as the input grows.

  python -m experiments.perceiver_listops --train_lengths=128 --flop_lengths=128,512,2048

Both classify ListOps expressions (`attnjax.data.ListOps`, configs/listops.py's task at each
length). The transformer is configs/listops.py's softmax encoder; the Perceiver is
`attnjax.models.perceiver_classifier.PerceiverClassifier` (32 latents of width 64, 2 blocks, 2 latent
layers). At `train_lengths` both train `--steps` steps and report held-out accuracy and seconds per
step; at every `flop_lengths` length the Perceiver's compiled forward FLOPs per example are
reported (linear in T). The encoder's are not: on CPU its attention runs in the fused C++ kernel, a
custom call XLA's cost analysis does not count. docs/results.md records a run.
"""

import sys

import jax
import jax.numpy as jnp
from absl import app
from absl import flags

from attnjax import data
from attnjax import models
from attnjax.models import perceiver_classifier
from attnjax.train import trainer
from configs import listops

_TRAIN_LENGTHS = flags.DEFINE_list("train_lengths", ["128"], "Lengths trained and evaluated.")
_FLOP_LENGTHS = flags.DEFINE_list("flop_lengths", ["128", "512", "2048"], "Lengths costed.")
_STEPS = flags.DEFINE_integer("steps", 2000, "Training steps (batch 32).")


def _models(seq_len):
  config = listops.get_config("mechanism=softmax,size=small")
  config.task.seq_len = seq_len
  config.task.min_length = seq_len // 4
  task = data.make_task(config.task)
  encoder = models.build_model(trainer.model_config_for_run(config), task.spec)
  perceiver = perceiver_classifier.PerceiverClassifier(vocab_size=task.spec.vocab_size,
                                                       num_classes=task.spec.num_classes)
  return task, {"transformer (softmax)": encoder, "perceiver": perceiver}


def main(argv):
  del argv
  out = sys.stdout
  out.write("| T | model | eval acc | s / step | params |\n| ---: | --- | ---: | ---: | ---: |\n")
  for t in (int(x) for x in _TRAIN_LENGTHS.value):
    task, built = _models(t)
    for name, model in built.items():
      r = perceiver_classifier.train_classifier(model, task, steps=_STEPS.value)
      out.write(f"| {t} | {name} | {r['eval_accuracy']:.3f} | {r['seconds_per_step']:.4f} | "
                f"{int(r['params'])} |\n")
  out.write("\n| T | Perceiver forward GFLOP / example |\n| ---: | ---: |\n")
  for t in (int(x) for x in _FLOP_LENGTHS.value):
    _, built = _models(t)
    model = built["perceiver"]
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, t), jnp.int32))["params"]
    flops = perceiver_classifier.forward_flops(model, params, (1, t)) / 1e9
    out.write(f"| {t} | {flops:.4f} |\n")


if __name__ == "__main__":
  app.run(main)
