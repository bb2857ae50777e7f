"""The train loop: `train_and_evaluate(config, workdir)`.

    loss = Σ w · CE(logits, targets) / Σ w         accuracy = Σ w · [argmax logits == target] / Σ w

over the weighted positions ("lm": every target position with weight 1; "classify": one label per
example). One train step = one micro-batch of `train.batch_size` examples; with
`optimizer.grad_accum_steps = k` the optimizer applies every k steps (optax.MultiSteps).

What a run does, in order: validate the config (no compile yet), build the task and model, build the
mesh and the shardings of the train state from the parameters' logical axis names, restore the
latest checkpoint in `<workdir>/checkpoints` if there is one (else initialise), then train with
periodic eval, metrics (TensorBoard + metrics.jsonl), async checkpoints and a progress bar.
Batches are a pure function of the step and the RNG of step s is `fold_in(rng, s)`, so a resumed
run repeats the uninterrupted run bit for bit. SIGTERM makes the loop save the current step, wait
for the save and exit with status 143.

A mechanism's fixed arrays (`ParamSpec.trainable=False`, e.g. FAVOR+'s random features) live in the
'buffers' collection of the state, never in the optimizer's reach; `train.redraw_buffers_every = n`
draws them afresh every n steps (Performer's feature redraw), from the step's RNG, so a resumed run
redraws the same. Mechanisms that sample get a key from the 'sample' rng stream in training steps.

Params are float32; `train.mixed_precision` (or `model.dtype = "bfloat16"`) computes in bfloat16;
losses and metrics are float32.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Optional

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import optax

from attnjax import registry
from attnjax.nn.maps import CAPTURE
from attnjax.parallel import mesh as mesh_lib
from attnjax.parallel import rules as rules_lib
from attnjax.train import checkpoint as checkpoint_lib
from attnjax.train import metrics as metrics_lib
from attnjax.train import optim
from attnjax.train import regularizers
from attnjax.train import validate
from attnjax.train import weight_methods

PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM


class _SigtermFlag:
  """Turns SIGTERM into a flag the loop polls, so the loop can save before exiting."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def any_process(self) -> bool:
    """True when any process got SIGTERM (all processes must stop at the same step)."""
    if jax.process_count() == 1:
      return self.requested
    flags = multihost_utils.process_allgather(np.int32(self.requested))
    return bool(np.max(flags))


def _make_task(task_config):
  from attnjax import data  # pylint: disable=import-outside-toplevel
  return data.make_task(task_config)


def _build_model(model_config, spec):
  from attnjax import models  # pylint: disable=import-outside-toplevel
  return models.build_model(model_config, spec)


def model_config_for_run(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """config.model with the compute dtype set by `train.mixed_precision` (params stay float32)."""
  model = copy.deepcopy(config.model)
  if config.train.get("mixed_precision", False):
    with model.unlocked():
      model.dtype = "bfloat16"
      model.param_dtype = "float32"
  return model


def weighted_metrics(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> dict:
  """Sums of weighted cross-entropy and correct predictions, and the weight total (float32)."""
  logits = logits.astype(jnp.float32)
  weights = weights.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  return {"loss_sum": jnp.sum(ce * weights), "correct_sum": jnp.sum(correct * weights),
          "weight_sum": jnp.sum(weights)}


def _ratios(sums: dict) -> dict:
  den = max(float(sums["weight_sum"]), 1e-12)
  return {"loss": float(sums["loss_sum"]) / den, "accuracy": float(sums["correct_sum"]) / den}


PARAM_SHARDINGS = "param_shardings.json"


def write_param_shardings(workdir: str, abstract_params: Any):
  """`<workdir>/param_shardings.json`: each parameter's path, shape and PartitionSpec, to check
  how a config's logical-axis rules laid the model out on the mesh."""
  table = {jax.tree_util.keystr(path): {"shape": list(x.shape),
                                        "spec": [None if a is None else a if isinstance(a, str)
                                                 else list(a) for a in x.sharding.spec]}
           for path, x in jax.tree_util.tree_leaves_with_path(abstract_params)}
  with open(os.path.join(workdir, PARAM_SHARDINGS), "w") as f:
    json.dump(table, f, indent=1)


class _LocalRows:
  """Which rows of a global batch this process must supply, as a Task (process_index,
  process_count) slice: the rows held by this process's devices under the batch sharding."""

  def __init__(self, mesh: jax.sharding.Mesh, global_size: int):
    sharding = mesh_lib.batch_sharding(mesh)
    indices = sharding.addressable_devices_indices_map((global_size,)).values()
    starts = [idx[0].start or 0 for idx in indices]
    stops = [global_size if idx[0].stop is None else idx[0].stop for idx in indices]
    start, stop = min(starts), max(stops)
    rows = stop - start
    if global_size % rows or start % rows:
      raise ValueError(f"train.batch_size: {global_size} rows cannot be split into this process's "
                       f"contiguous block [{start}, {stop})")
    self.process_index, self.process_count = start // rows, global_size // rows


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       task: Any = None,
                       model: Optional[nn.Module] = None,
                       make_task: Optional[Callable[..., Any]] = None,
                       build_model: Optional[Callable[..., nn.Module]] = None) -> dict[str, Any]:
  """Trains `config.model` on `config.task` in `workdir` (resuming from its latest checkpoint).

  Args:
    config: `task`, `model`, `optimizer`, `train`, `mesh`, `logical_axis_rules` (see
      configs/mqar.py for every field).
    workdir: directory for checkpoints/, tensorboard/ and metrics.jsonl.
    task, model: ready-made Task and Flax module (default: attnjax.data.make_task(config.task) and
      attnjax.models.build_model(config.model, task.spec)); make_task / build_model replace those
      factories.

  Returns:
    Final metrics: eval_loss, eval_accuracy, train_loss, train_accuracy, steps_per_sec,
    tokens_per_sec, num_params, step (and preempted=True never: SIGTERM exits with status 143).
  """
  mesh_lib.maybe_initialize_distributed()
  # The workdir is created only once the task and model build, so a bad config leaves none.
  validate.validate_config(config, workdir, create_workdir=False)
  tcfg = config.train
  num_steps, batch_size = int(tcfg.num_steps), int(tcfg.batch_size)
  is_chief = jax.process_index() == 0

  task = task if task is not None else (make_task or _make_task)(config.task)
  spec = task.spec
  if model is None:
    model = (build_model or _build_model)(model_config_for_run(config), spec)
  mesh = mesh_lib.make_mesh(config.get("mesh", None))
  rules = config.get("logical_axis_rules", None) or rules_lib.DEFAULT_LOGICAL_AXIS_RULES
  rules = tuple(tuple(r) for r in rules)
  tx, schedule = optim.make_optimizer(config.optimizer, num_steps)
  accum = int(config.optimizer.get("grad_accum_steps", 1) or 1)
  log_every = int(tcfg.get("log_every", 50))
  eval_batch_size = int(tcfg.get("eval_batch_size", batch_size))
  tokens_per_step = batch_size * int(spec.seq_len)

  input_dtype = np.dtype(spec.input_dtype)
  dummy = jnp.zeros((1,) + tuple(spec.input_shape), input_dtype)

  redraw_every = int(tcfg.get("redraw_buffers_every", 0) or 0)
  attention_reg = tcfg.get("attention_regularizer", None)  # checked by validate
  weight_method = tcfg.get("weight_method", None)  # checked by validate

  def init_variables(params_rng, dropout_rng):
    variables = model.init({"params": params_rng, "dropout": dropout_rng}, dummy, train=False)
    extra = {**regularizers.extra_params(attention_reg, int(config.model.num_heads)),
             **weight_methods.extra_params(weight_method, nn.unbox(variables["params"]))}
    return {**variables, "params": {**variables["params"], **extra}} if extra else variables

  def init_state(rng):
    params_rng, dropout_rng, state_rng = jax.random.split(rng, 3)
    variables = init_variables(params_rng, dropout_rng)
    params = variables["params"]
    zeros = jnp.zeros((), jnp.float32)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
             "rng": state_rng, "window": {"loss_sum": zeros, "correct_sum": zeros,
                                          "weight_sum": zeros}}
    if variables.get(registry.BUFFERS):
      state["buffers"] = variables[registry.BUFFERS]
    return state

  seed_rng = jax.random.PRNGKey(int(tcfg.get("seed", 0)))
  boxed = jax.eval_shape(init_state, seed_rng)
  state_shardings = mesh_lib.logical_shardings(boxed, mesh, rules)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  data_sharding = mesh_lib.batch_sharding(mesh)
  abstract_state = checkpoint_lib.abstract_like(nn.unbox(boxed), state_shardings)
  from attnjax import models  # pylint: disable=import-outside-toplevel
  num_params = models.param_count(abstract_state["params"])
  validate.check_workdir(workdir, create=True)
  if is_chief:
    write_param_shardings(workdir, abstract_state["params"])

  def loss_fn(params, buffers, batch, rng, train, step):
    params, reg_params = regularizers.split_params(params)
    dense, method_params = weight_methods.split_params(params)
    # DQA / ASWL: the forward pass (training and evaluation) sees the quantized / pruned kernels.
    params = weight_methods.effective_params(weight_method, dense, method_params, step, num_steps)
    variables = {"params": params, **({registry.BUFFERS: buffers} if buffers else {})}
    rngs = {"dropout": rng, registry.SAMPLE_RNG: jax.random.fold_in(rng, 1)} if train else None
    if train and attention_reg:
      # The attention maps are sown as jnp arrays in this forward, so the penalty differentiates.
      logits, maps = model.apply(variables, batch["inputs"], train=train, rngs=rngs,
                                 mutable=[CAPTURE])
    else:
      logits = model.apply(variables, batch["inputs"], train=train, rngs=rngs)
    sums = weighted_metrics(logits, batch["targets"], batch["weights"])
    loss = sums["loss_sum"] / jnp.maximum(sums["weight_sum"], 1e-12)
    if train and attention_reg:
      loss = loss + float(attention_reg["weight"]) * regularizers.penalty(
          attention_reg, maps, batch["inputs"], reg_params)
    if train and weight_method:
      loss = loss + weight_methods.penalty(weight_method, dense, method_params, step, num_steps)
    return loss, sums

  def train_step(state, batch):
    rng = jax.random.fold_in(state["rng"], state["step"])
    buffers = state.get("buffers", {})
    if buffers and redraw_every > 0:
      # Only the buffers of a fresh init are kept; XLA drops the rest of it.
      redraw = (state["step"] > 0) & (state["step"] % redraw_every == 0)
      fresh_rngs = jax.random.split(jax.random.fold_in(rng, 2))
      buffers = jax.lax.cond(
          redraw, lambda: nn.unbox(init_variables(*fresh_rngs)[registry.BUFFERS]), lambda: buffers)
    (_, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], buffers, batch, rng, True, state["step"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    # The metric window restarts at multiples of log_every; it lives in the state (and the
    # checkpoint), so a resumed run logs the same window means as an uninterrupted one.
    fresh = state["step"] % log_every == 0
    window = jax.tree.map(lambda w, s: jnp.where(fresh, 0.0, w) + s, state["window"], sums)
    new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
                 "rng": state["rng"], "window": window}
    if buffers:
      new_state["buffers"] = buffers
    return new_state, {"grad_norm": optax.tree.norm(grads),
                       "learning_rate": schedule(state["step"] // accum)}

  def eval_step(params, buffers, batch, step):
    return loss_fn(params, buffers, batch, None, False, step)[1]

  # Activation constraints (nn.with_logical_constraint in the model) apply when the logical rules
  # are in context; parameter and batch shardings come from the jit in/out shardings either way.
  # `train.activation_sharding` is off by default: flax's DenseGeneral re-initialises a
  # multi-dimensional kernel abstractly inside apply (its shape check) and, with rules in context,
  # constrains the flattened kernel with the full-rank logical names, which fails.
  activation_rules = rules if tcfg.get("activation_sharding", False) else ()
  with jax.set_mesh(mesh), nn.logical_axis_rules(activation_rules):
    init_fn = jax.jit(lambda r: nn.unbox(init_state(r)), out_shardings=state_shardings)
    step_fn = jax.jit(train_step, in_shardings=(state_shardings, data_sharding),
                      out_shardings=(state_shardings, replicated), donate_argnums=0)
    eval_fn = jax.jit(eval_step, in_shardings=(state_shardings["params"],
                                               state_shardings.get("buffers", {}), data_sharding,
                                               replicated),
                      out_shardings=replicated)
    train_rows = _LocalRows(mesh, batch_size)
    eval_rows = _LocalRows(mesh, eval_batch_size)

    def get_batch(step, split, size, rows):
      local = task.batch(step, size, split=split, process_index=rows.process_index,
                         process_count=rows.process_count)
      return mesh_lib.global_batch(local, mesh, size)

    def evaluate(state):
      totals = None
      for i in range(int(tcfg.get("eval_batches", 1))):
        sums = eval_fn(state["params"], state.get("buffers", {}),
                       get_batch(i, "valid", eval_batch_size, eval_rows), state["step"])
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
      if totals is None:
        return {}
      return {f"eval_{k}": v for k, v in _ratios(jax.device_get(totals)).items()}

    ckpt = checkpoint_lib.Checkpointer(workdir, keep=int(tcfg.get("keep_checkpoints", 3)),
                                       best_metric=tcfg.get("best_metric", None),
                                       async_save=bool(tcfg.get("async_checkpoints", True)))
    latest = ckpt.latest_step()
    if latest is not None:
      state, meta = ckpt.restore(latest, abstract_state)
      if int(meta["data_position"]) != int(state["step"]):
        raise ValueError(f"checkpoint {latest}: data position {meta['data_position']} does not "
                         f"match step {int(state['step'])}")
      logging.info("Resumed from %s at step %d", ckpt.directory, latest)
    else:
      # Traced without logical rules: flax's DenseGeneral reshapes multi-dimensional kernels
      # during init, and a rule-driven sharding constraint on the reshaped (lower-rank) kernel
      # fails. The out_shardings place the parameters all the same.
      with nn.logical_axis_rules(()):
        state = init_fn(seed_rng)
    start = int(jax.device_get(state["step"]))
    if is_chief:
      logging.info("Model: %d parameters; mesh %s", num_params, dict(mesh.shape))
      print(f"attnjax: {num_params:,} parameters, mesh {dict(mesh.shape)}, "
            f"{'resuming at step ' + str(start) if start else 'starting'}", flush=True)
    writer = metrics_lib.MetricWriter(workdir, resume_step=start if latest is not None else None,
                                      enabled=is_chief)
    progress = metrics_lib.Progress(start=start, total=num_steps, tokens_per_step=tokens_per_step,
                                    enabled=is_chief)
    eval_every = int(tcfg.get("eval_every", num_steps))
    checkpoint_every = int(tcfg.get("checkpoint_every", num_steps))
    train_metrics, eval_metrics, rates = {}, {}, {}
    timed_steps, timed_seconds, clock = 0, 0.0, None

    try:
      with _SigtermFlag() as sigterm:
        step = start
        while step < num_steps:
          state, step_metrics = step_fn(state, get_batch(step, "train", batch_size, train_rows))
          step += 1
          if clock is None:  # the first step compiles: time from its end
            jax.block_until_ready(state["step"])
            clock = time.perf_counter()
            progress.rates(step)
          else:
            timed_steps += 1
          logged = step % log_every == 0 or step == num_steps
          evaluated = step % eval_every == 0 or step == num_steps
          saved = step % checkpoint_every == 0 or step == num_steps
          if logged or evaluated or saved:
            jax.block_until_ready(state["step"])
            timed_seconds += time.perf_counter() - clock
          if logged:
            train_metrics = {f"train_{k}": v
                             for k, v in _ratios(jax.device_get(state["window"])).items()}
            rates = progress.rates(step)
            writer.write(step, {**train_metrics, **jax.device_get(step_metrics), **rates})
            progress.update(step, {"loss": train_metrics["train_loss"], **rates})
          if evaluated:
            eval_metrics = evaluate(state)
            writer.write(step, eval_metrics)
          if saved:
            ckpt.save(step, state, metrics=eval_metrics if evaluated else None)
          if logged or evaluated or saved:
            clock = time.perf_counter()
          if sigterm.any_process():
            if not saved:
              ckpt.save(step, state, metrics=None)
            ckpt.wait_until_finished()
            logging.warning("SIGTERM: saved step %d, exiting", step)
            raise SystemExit(PREEMPTED_EXIT_CODE)
      if start >= num_steps:  # nothing left to train: report the final checkpoint's metrics
        eval_metrics = evaluate(state)
    finally:
      # Also on a crash (exception) or SIGTERM: the save in flight completes, so no checkpoint is
      # lost or torn, and the logs are flushed.
      progress.close()
      ckpt.close()
      writer.close()

  result = {**train_metrics, **eval_metrics, "num_params": num_params, "step": step}
  if timed_seconds > 0 and timed_steps > 0:
    steps_per_sec = timed_steps / timed_seconds
    result.update(steps_per_sec=steps_per_sec, tokens_per_sec=steps_per_sec * tokens_per_step)
  if not math.isfinite(result.get("train_loss", 0.0)):
    logging.warning("Non-finite train loss %s", result["train_loss"])
  return result
