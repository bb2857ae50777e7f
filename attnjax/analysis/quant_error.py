"""Error statistics of quantized attention against full precision (the library side of
`experiments/quant_error.py`, whose results are docs/quantized.md).

  error_statistics(out, ref)        cosine similarity, relative L1, RMSE of an output against the
                                    full-precision one (float64)
  gaussian_inputs / outlier_inputs  N(0, 1) q, k, v; the same with a common offset on a few key
                                    channels (the channel-wise outliers SageAttention finds in K)
  trained_lm_inputs(config, workdir)  trains a language model config, then the q, k, v each of its
                                    attention layers computes on held-out text
  measure(cases)                    every variant of `VARIANTS` on every case: one row each
  run(config, workdir, ...)         all three kinds of inputs; `to_markdown(rows)` the table

Variants: SageAttention int8 (arXiv:2410.02367) with and without key smoothing, SageAttention3's
microscaling FP4 and its 8-bit trainable form SageBwd (arXiv:2505.11594), each with its defaults.
The reference is softmax attention in float32 at the highest matmul precision, under the same mask.

The trained model's q, k, v are recomputed from each attention layer's recorded input (a Flax method
interceptor, `analysis.sinks.recorded_attention_inputs`) and its parameters: the layer's own q, k, v
projections and RoPE, exactly what its mechanism received.
"""

from __future__ import annotations

import platform
from typing import Any, Iterable

__all__ = ["VARIANTS", "error_statistics", "gaussian_inputs", "outlier_inputs", "layer_qkv",
           "trained_lm_inputs", "measure", "machine", "run", "to_markdown"]

# name -> (registered mechanism, keyword arguments)
VARIANTS = {
    "sage int8": ("sage_attention", {}),
    "sage int8, no smoothing": ("sage_attention", {"smooth_k": False}),
    "sage3 fp4": ("sage_attention3", {}),
    "sage3 8-bit (SageBwd fwd)": ("sage_attention3", {"precision": "int8"}),
}


def error_statistics(out, ref) -> dict[str, float]:
  """`cosine` = <o, r> / (|o| |r|), `rel_l1` = Σ|o - r| / Σ|r|, `rmse` = sqrt(mean (o - r)²), over
  every element (float64)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  o, r = np.asarray(out, np.float64).ravel(), np.asarray(ref, np.float64).ravel()
  return {"cosine": float(o @ r / (np.linalg.norm(o) * np.linalg.norm(r))),
          "rel_l1": float(np.abs(o - r).sum() / np.abs(r).sum()),
          "rmse": float(np.sqrt(np.mean((o - r) ** 2)))}


def gaussian_inputs(*, B: int, T: int, N: int, H: int, seed: int = 0):
  """Standard-normal `q, k, v [B, T, N, H]` (float32)."""
  import jax  # pylint: disable=import-outside-toplevel
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  return tuple(jax.random.normal(key, (B, T, N, H)) for key in keys)


def outlier_inputs(*, B: int, T: int, N: int, H: int, channels: int = 4, offset: float = 20.0,
                   seed: int = 0):
  """`gaussian_inputs` with `offset` added to the first `channels` channels of every key."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  q, k, v = gaussian_inputs(B=B, T=T, N=N, H=H, seed=seed)
  return q, k + offset * (jnp.arange(H) < channels), v


def layer_qkv(module, layer_params, x):
  """The q, k, v a causal self-attention layer (`nn.MultiHeadAttention`) computes from its input
  `x [B, T, D]`: its projections, then RoPE when the layer has it."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from attnjax.ops.positional import rope  # pylint: disable=import-outside-toplevel
  if module.normalize_qk or module.rope_scaling or getattr(module, "fope", None):
    raise ValueError("layer_qkv: layers with normalize_qk, rope_scaling or fope are not supported")

  def project(name):
    p = layer_params[name]
    y = jnp.einsum("btd,dnh->btnh", x, p["kernel"])
    return y + p["bias"] if "bias" in p else y

  q, k, v = project("query"), project("key"), project("value")
  if module.rope_base is not None:
    pos = jnp.arange(x.shape[1])
    q = rope.apply_rope(q, pos, base=module.rope_base, fraction=module.rope_fraction)
    k = rope.apply_rope(k, pos, base=module.rope_base, fraction=module.rope_fraction)
  return q, k, v


def trained_lm_inputs(config, workdir: str, *, rows: int = 8) -> tuple[list, dict]:
  """Trains `config` (a decoder LM, e.g. configs/lm_bytes.py) in `workdir` (resuming a finished run
  there), then returns `([(layer path, q, k, v, scale)], final metrics)` on `rows` held-out windows."""
  from attnjax import data  # pylint: disable=import-outside-toplevel
  from attnjax import models  # pylint: disable=import-outside-toplevel
  from attnjax.analysis import sinks  # pylint: disable=import-outside-toplevel
  from attnjax.train import trainer  # pylint: disable=import-outside-toplevel
  metrics = trainer.train_and_evaluate(config, workdir)
  params, buffers = sinks.restore_params(workdir)
  variables = {"params": params, **({"buffers": buffers} if buffers else {})}
  task = data.make_task(config.task)
  model = models.build_model(trainer.model_config_for_run(config), task.spec)
  tokens = task.batch(0, rows, split="valid")["inputs"]
  layers = []
  for module, path, x in sinks.recorded_attention_inputs(model, variables, tokens):
    q, k, v = layer_qkv(module, sinks.layer_params_at(variables["params"], path), x)
    layers.append(("/".join(path), q, k, v, module.scale))
  return layers, metrics


def measure(cases: Iterable[tuple[str, Any, Any, Any, bool, Any]]) -> list[dict]:
  """One row per (case, variant): `{case, variant, cosine, rel_l1, rmse}`. A case is
  `(name, q, k, v, causal, scale)` (scale None: H ** -0.5)."""
  import jax  # pylint: disable=import-outside-toplevel
  from attnjax import registry  # pylint: disable=import-outside-toplevel
  from attnjax.ops.softmax import softmax_attention  # pylint: disable=import-outside-toplevel
  rows = []
  for name, q, k, v, causal, scale in cases:
    with jax.default_matmul_precision("highest"):
      ref = jax.jit(lambda q, k, v, c=causal, s=scale: softmax_attention(q, k, v, causal=c,
                                                                         scale=s))(q, k, v)
    for variant, (mechanism, kwargs) in VARIANTS.items():
      mech = registry.get(mechanism)
      out = jax.jit(lambda q, k, v, m=mech, kw=kwargs, c=causal, s=scale: m(
          q, k, v, causal=c, scale=s, **kw))(q, k, v)
      rows.append({"case": name, "variant": variant, **error_statistics(out, ref)})
  return rows


def machine() -> str:
  """The platform, CPU and JAX version the numbers come from."""
  import jax  # pylint: disable=import-outside-toplevel
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  import os  # pylint: disable=import-outside-toplevel
  return (f"{jax.default_backend()} ({cpu}, {os.cpu_count()} cores), jax {jax.__version__}, "
          f"{platform.system()} {platform.release()}")


def run(config, workdir: str, *, T: int = 256, heads: int = 4, head_dim: int = 64,
        batch: int = 2, seed: int = 0, rows: int = 8) -> dict[str, Any]:
  """Error statistics on (a) N(0, 1) inputs, (b) the same with outlier key channels, (c) the q, k, v
  of the model `config` trains in `workdir`. Returns `{"rows", "train_metrics", "machine"}`."""
  shapes = dict(B=batch, T=T, N=heads, H=head_dim, seed=seed)
  cases = [(f"N(0,1), T={T}, H={head_dim}", *gaussian_inputs(**shapes), False, None),
           (f"N(0,1) + 20 on 4 key channels, T={T}, H={head_dim}", *outlier_inputs(**shapes),
            False, None)]
  layers, metrics = trained_lm_inputs(config, workdir, rows=rows)
  for path, q, k, v, scale in layers:
    cases.append((f"trained LM {path} (causal, T={q.shape[1]}, H={q.shape[-1]})", q, k, v, True,
                  scale))
  return {"rows": measure(cases), "train_metrics": metrics, "machine": machine()}


def to_markdown(rows: list[dict]) -> str:
  """The rows as a markdown table (one line per case and variant)."""
  lines = ["| inputs | variant | cosine | rel. L1 | RMSE |", "|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['case']} | {r['variant']} | {r['cosine']:.6f} | {r['rel_l1']:.4f} | "
                 f"{r['rmse']:.2e} |")
  return "\n".join(lines) + "\n"
