"""Attention sinks and length extrapolation of trained language models (the library side of
`experiments/sinks.py`).

  restore_params(run_dir)                        a run's latest checkpointed parameters
  recorded_attention_inputs(model, variables, x)  each MultiHeadAttention call's module, path, input
  attention_probe(module, layer_params, x)       a causal self-attention layer's weights [B,N,T,S]
  sink_statistics(model, variables, tokens)      per layer: first-token share, share of sink heads
  evaluate(config, run_dir, batches=, factors=)  eval loss at T and k·T, sink statistics

Weights are read by probing each attention layer's own mechanism with one-hot values: the layer's
inputs are recorded during the forward (a Flax method interceptor on `MultiHeadAttention`), its
queries, keys and per-token inputs recomputed from its parameters, and the mechanism called with
`v[b, s, :, :] = e_s`, so output channel s is the weight on key s. This is exact for mechanisms
linear in the values (softmax, softpick, cog (signed: the share is of |w|), FoX, selective
attention); for ReLA, whose per-token RMSNorm is not linear, the probe drops the gate and uses unit
scales, which leaves each head's shares w_0 / Σ_s w_s unchanged (the norm divides a token's row by
one number). Sink rate: Gu et al., "When Attention Sink Emerges in Language Models",
arXiv:2410.10781 (a head is a sink head when its mean first-token weight exceeds 0.3).
"""

from __future__ import annotations

import os

__all__ = ["SINK_THRESHOLD", "attention_probe", "evaluate", "layer_params_at",
           "recorded_attention_inputs", "restore_params", "sink_statistics"]

SINK_THRESHOLD = 0.3  # Gu et al.'s ε


def restore_params(run_dir):
  """(params, buffers) of the run's latest checkpoint."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from attnjax.train import checkpoint  # pylint: disable=import-outside-toplevel
  manager = ocp.CheckpointManager(os.path.join(os.path.abspath(run_dir), "checkpoints"),
                                  item_names=(checkpoint.STATE, checkpoint.META))
  step = manager.latest_step()
  if step is None:
    raise ValueError(f"{run_dir}: no checkpoint (train the sweep first)")
  state = manager.restore(step, args=ocp.args.Composite(
      **{checkpoint.STATE: ocp.args.StandardRestore()}))[checkpoint.STATE]
  manager.close()
  return state["params"], state.get("buffers", {})


def recorded_attention_inputs(model, variables, tokens):
  """Runs the model once; returns [(module, path, inputs_q)] for every MultiHeadAttention call."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from attnjax.nn import MultiHeadAttention  # pylint: disable=import-outside-toplevel
  calls = []

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, MultiHeadAttention) and context.method_name == "__call__":
      calls.append((context.module, tuple(context.module.scope.path), args[0]))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    model.apply(variables, tokens)
  return calls


def layer_params_at(params, path):
  """The parameters of the module at `path` (partitioning boxes removed)."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  node = params
  for name in path:
    node = node[name]
  return nn.unbox(node)


def attention_probe(module, layer_params, x):
  """Weights `[B, N, T, S]` of one causal self-attention layer on its input `x [B, T, D]`."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from attnjax import registry  # pylint: disable=import-outside-toplevel
  from attnjax.ops.positional import rope  # pylint: disable=import-outside-toplevel
  mech = module.mechanism
  mech = registry.get(mech) if isinstance(mech, str) else mech
  if module.normalize_qk:
    raise ValueError("attention_probe: normalize_qk layers are not supported")
  N = module.num_heads
  K = module.num_kv_heads or N
  H = layer_params["value"]["kernel"].shape[-1]
  B, T = x.shape[:2]

  def project(name):
    p = layer_params[name]
    y = jnp.einsum("btd,dnh->btnh", x, p["kernel"])
    return y + p["bias"] if "bias" in p else y

  q = project("query") if "q" in mech.reads else jnp.zeros((B, T, N, H))
  k = project("key") if "k" in mech.reads else jnp.zeros((B, T, K, H))
  if module.rope_base is not None:
    pos = jnp.arange(T)
    q = rope.apply_rope(q, pos, base=module.rope_base, fraction=module.rope_fraction)
    k = rope.apply_rope(k, pos, base=module.rope_base, fraction=module.rope_fraction)
  tokens = {}
  for spec in mech.token_inputs:
    if spec.kind != "projected":
      raise ValueError(f"attention_probe: {mech.name} needs the given input {spec.name}")
    p = layer_params[f"{spec.name}_proj"]
    y = (jnp.einsum("btd,d...->bt...", x, p["kernel"]) + p["bias"]).reshape(
        (B, T) + tuple(spec.shape(N, K, H)))
    tokens[spec.name] = y if spec.activation is None else spec.activation(y)
  arrays = {spec.name: layer_params[spec.name] for spec in mech.params}
  if mech.name == "rectified_linear_attention":
    # One number per token divides ReLA's row (its RMSNorm): shares are unchanged without the gate.
    arrays = {"rms_scale": jnp.ones((N, T)), "rms_gate": None}
  onehot = jnp.broadcast_to(jnp.eye(T)[None, :, None, :], (B, T, K, T))
  kwargs = {**dict(module.mechanism_kwargs or {}), **arrays, **tokens}
  out = jax.jit(lambda q, k, v: mech(q, k, v, causal=True, cross=False, scale=module.scale,
                                     **kwargs))(q, k, onehot)
  return jnp.transpose(out, (0, 2, 1, 3))                     # [B, N, T, S]


def sink_statistics(model, variables, tokens):
  """Per layer: (mean first-token share over heads and queries t >= 1, share of sink heads)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  out = []
  for module, path, x in recorded_attention_inputs(model, variables, tokens):
    w = jnp.abs(attention_probe(module, layer_params_at(variables["params"], path), x))
    share = w[..., 1:, 0] / jnp.maximum(jnp.sum(w[..., 1:, :], axis=-1), 1e-30)   # [B, N, T-1]
    per_head = jnp.mean(share, axis=(0, 2))
    out.append((float(jnp.mean(per_head)), float(jnp.mean(per_head > SINK_THRESHOLD))))
  return out


def evaluate(config, run_dir, *, batches, factors):
  """The run's metrics (see the module docstring)."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from attnjax import data, models  # pylint: disable=import-outside-toplevel
  from attnjax.train import trainer  # pylint: disable=import-outside-toplevel
  params, buffers = restore_params(run_dir)
  variables = {"params": params, **({"buffers": buffers} if buffers else {})}
  T = int(config.task.seq_len)
  result = {}
  for factor in [1] + [int(f) for f in factors]:
    task_config = config.task.copy_and_resolve_references()
    task_config.seq_len = T * factor
    task = data.make_task(task_config)
    model = models.build_model(trainer.model_config_for_run(config), task.spec)
    apply = jax.jit(lambda v, x, model=model: model.apply(v, x))
    sums = None
    for i in range(batches):
      batch = task.batch(i, int(config.train.batch_size), split="valid")
      s = trainer.weighted_metrics(apply(variables, batch["inputs"]), batch["targets"],
                                   batch["weights"])
      sums = s if sums is None else jax.tree.map(np.add, sums, s)
    result["eval_loss" if factor == 1 else f"loss_{factor}x"] = float(
        sums["loss_sum"] / sums["weight_sum"])
    if factor == 1:
      stats = sink_statistics(model, variables, task.batch(0, 8, split="valid")["inputs"])
      result["sink_share"] = [s for s, _ in stats]
      result["sink_rate"] = [r for _, r in stats]
  return result
