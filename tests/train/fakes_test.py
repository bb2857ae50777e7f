"""A tiny task and model with the issue-4 interfaces, for training tests that must not depend on
attnjax.data / attnjax.models (and must stay fast on 2 CPU cores), plus `run_in_subprocess` for the
kill, SIGTERM, multi-device and multi-process tests.

FakeTask ("lm"): a random token sequence whose second half repeats its first half; the weighted
targets are the next tokens of the second half, so a model that attends back can reach accuracy 1.
TinyLM: embedding -> one softmax attention layer (attnjax.nn.MultiHeadAttention, causal) -> MLP
-> logits, with logical axis names on every parameter and on activations.
"""

import dataclasses
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np

import attnjax as aj

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RULES = (("batch", ("data", "fsdp")), ("length", None), ("embed", "fsdp"), ("mlp", "tensor"),
         ("heads", "tensor"), ("kv", None), ("vocab", "tensor"), ("norm", None))


@dataclasses.dataclass(frozen=True)
class FakeSpec:
  name: str = "fake_copy"
  kind: str = "lm"
  input_shape: tuple = (16,)
  input_dtype: str = "int32"
  vocab_size: int = 16
  num_classes: int = 16
  seq_len: int = 16


class FakeTask:
  """Copy task; a batch is a pure function of (seed, split, step); process p gets rows
  [p·b/P, (p+1)·b/P) of the global batch."""

  def __init__(self, seed: int = 0, seq_len: int = 16, vocab_size: int = 16):
    self.seed = seed
    self.spec = FakeSpec(input_shape=(seq_len,), vocab_size=vocab_size, num_classes=vocab_size,
                         seq_len=seq_len)

  def batch(self, step, batch_size, *, split="train", process_index=0, process_count=1):
    t, v = self.spec.seq_len, self.spec.vocab_size
    rng = np.random.default_rng([self.seed, {"train": 0, "valid": 1}[split], step])
    half = rng.integers(0, v, (batch_size, t // 2 + 1), dtype=np.int32)
    seq = np.concatenate([half, half[:, 1:]], axis=1)[:, :t + 1]
    weights = np.zeros((batch_size, t), np.float32)
    weights[:, t // 2:] = 1.0
    rows = slice(process_index * batch_size // process_count,
                 (process_index + 1) * batch_size // process_count)
    return {"inputs": seq[rows, :-1], "targets": seq[rows, 1:], "weights": weights[rows]}


def _dense(features, names, name):
  return nn.DenseGeneral(features, name=name, use_bias=False,
                         kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                                  names))


class TinyLM(nn.Module):
  vocab_size: int = 16
  width: int = 16
  num_heads: int = 2
  mlp_dim: int = 32
  dtype: str = "float32"
  mechanism: str = "softmax"

  @nn.compact
  def __call__(self, inputs, *, train=False):
    dtype = jnp.dtype(self.dtype)
    embed = self.param("embed", nn.with_logical_partitioning(nn.initializers.normal(0.5),
                                                             ("vocab", "embed")),
                       (self.vocab_size, self.width), jnp.float32)
    t = inputs.shape[1]
    pos = self.param("pos", nn.with_logical_partitioning(nn.initializers.normal(0.5),
                                                         ("length", "embed")),
                     (t, self.width), jnp.float32)
    x = (embed[inputs] + pos[None]).astype(dtype)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    x = x + aj.nn.MultiHeadAttention(num_heads=self.num_heads, mechanism=self.mechanism,
                                     causal=True, dtype=dtype, name="attn")(x)
    h = nn.gelu(_dense(self.mlp_dim, ("embed", "mlp"), "mlp_in")(x.astype(dtype)))
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    x = x + _dense(self.width, ("mlp", "embed"), "mlp_out")(h)
    x = nn.Dropout(0.1, deterministic=not train)(x)
    return _dense(self.vocab_size, ("embed", "vocab"), "logits")(x)


def make_config(**train_overrides) -> ml_collections.ConfigDict:
  """A full training config (the issue-4 fields) for FakeTask + TinyLM."""
  config = ml_collections.ConfigDict()
  config.task = ml_collections.ConfigDict({"name": "fake_copy", "seed": 0})
  config.model = ml_collections.ConfigDict({
      "arch": "decoder_lm", "width": 16, "depth": 1, "num_heads": 2, "num_kv_heads": None,
      "mlp_dim": 32, "mechanism": "softmax", "dtype": "float32", "param_dtype": "float32"})
  config.optimizer = ml_collections.ConfigDict({
      "name": "adamw", "learning_rate": 3e-3, "warmup_steps": 2, "decay": "cosine",
      "weight_decay": 0.01, "b1": 0.9, "b2": 0.99, "clip_norm": 1.0, "grad_accum_steps": 1})
  config.train = ml_collections.ConfigDict({
      "num_steps": 12, "batch_size": 8, "eval_every": 4, "eval_batches": 2, "log_every": 1,
      "checkpoint_every": 4, "keep_checkpoints": 2, "best_metric": "eval_accuracy", "seed": 0,
      "mixed_precision": False})
  config.mesh = {"data": -1}
  config.logical_axis_rules = RULES
  config.train.update(train_overrides)
  return config


def fake_parts(config):
  return dict(task=FakeTask(seed=config.task.seed),
              model=TinyLM(dtype="bfloat16" if config.train.mixed_precision else "float32"))


# Run by `run_in_subprocess`: trains with the fakes (multi-process when JAX_COORDINATOR_ADDRESS,
# JAX_NUM_PROCESSES and JAX_PROCESS_ID are set) and writes result<process>.json;
# env ATTNJAX_TEST_KILL_AT_STEP=s sends
# SIGKILL (or ATTNJAX_TEST_SIGNAL) to itself when the batch of step s is requested (after the
# checkpoint directory ATTNJAX_TEST_WAIT_FOR, e.g. "4", has been finalised), and
# ATTNJAX_TEST_KILL_AFTER_SAVE=s kills right after the async save of step s has started.
_RUNNER = r"""
import json, os, signal, sys, time
sys.path.insert(0, {repo!r})
import jax
if os.environ.get("JAX_COORDINATOR_ADDRESS"):  # before attnjax is imported (it touches the backend)
  jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"],
                             int(os.environ["JAX_NUM_PROCESSES"]),
                             int(os.environ["JAX_PROCESS_ID"]))
import ml_collections
from attnjax.train import checkpoint, trainer
from tests.train import fakes_test
config = ml_collections.ConfigDict(json.loads({config!r}))
config.logical_axis_rules = fakes_test.RULES
parts = fakes_test.fake_parts(config)
sig = getattr(signal, os.environ.get("ATTNJAX_TEST_SIGNAL", "SIGKILL"))
kill_step = int(os.environ.get("ATTNJAX_TEST_KILL_AT_STEP", -1))
if kill_step >= 0:
  batch = parts["task"].batch
  wait_for = os.path.join({workdir!r}, "checkpoints", os.environ.get("ATTNJAX_TEST_WAIT_FOR", ""))
  def killing_batch(step, *a, **k):
    if step == kill_step and k.get("split", "train") == "train":
      deadline = time.time() + 60
      while not os.path.isdir(wait_for) and time.time() < deadline:
        time.sleep(0.01)
      os.kill(os.getpid(), sig)
    return batch(step, *a, **k)
  parts["task"].batch = killing_batch
save_step = int(os.environ.get("ATTNJAX_TEST_KILL_AFTER_SAVE", -1))
if save_step >= 0:
  save = checkpoint.Checkpointer.save
  def killing_save(self, step, state, **k):
    out = save(self, step, state, **k)
    if step == save_step:
      with open(os.path.join({workdir!r}, "kill_marker.json"), "w") as f:
        json.dump({{"saving": bool(self.manager.is_saving_in_progress())}}, f)
      os.kill(os.getpid(), signal.SIGKILL)
    return out
  checkpoint.Checkpointer.save = killing_save
result = trainer.train_and_evaluate(config, {workdir!r}, **parts)
with open(os.path.join({workdir!r}, f"result{{jax.process_index()}}.json"), "w") as f:
  json.dump(result, f)
"""


def config_to_json(config) -> str:
  d = config.to_dict()
  d.pop("logical_axis_rules", None)
  return json.dumps(d)


def run_in_subprocess(config, workdir, *, devices=1, env=None, timeout=300, wait=True):
  """Runs the fake training in a fresh python (its own XLA device count). Returns the
  CompletedProcess (or the Popen when wait=False)."""
  script = _RUNNER.format(repo=REPO, config=config_to_json(config), workdir=str(workdir))
  full_env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO,
              "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
              **(env or {})}
  args = [sys.executable, "-c", script]
  if not wait:
    return subprocess.Popen(args, env=full_env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
  return subprocess.run(args, env=full_env, cwd=REPO, capture_output=True, text=True,
                        timeout=timeout, check=False)


def test_fake_task_is_deterministic_and_split_by_process():
  task = FakeTask(seed=3)
  a = task.batch(5, 8)
  b = task.batch(5, 8)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  halves = [task.batch(5, 8, process_index=p, process_count=2) for p in range(2)]
  np.testing.assert_array_equal(np.concatenate([h["inputs"] for h in halves]), a["inputs"])
  assert not np.array_equal(task.batch(5, 8, split="valid")["inputs"], a["inputs"])
  # The target of position t is the input at t + 1; the weighted half is a copy of the first half.
  np.testing.assert_array_equal(a["targets"][:, :-1], a["inputs"][:, 1:])
