"""Attention over a network's own weights, by flag: `train.weight_method` trains any model of the
project with DQA quantization (#230) or ASWL pruning (#169) of its kernels, no model change.

  name    settings (defaults: the papers')                     paper (catalog row)
  "dqa"   strength λ (1.0), bits ([2, 4, 8]),                  DQA, arXiv:2103.13322 (#230);
          penalty g ([1, 4, 16]), init_temperature (100),      `attnjax.train.quantization`
          final_temperature (0.03, reached at the last step)
  "aswl"  decay (5.0), pruning_factor α (1.0), target r (0)   ASWL, arXiv:2111.02399 (#169);
                                                               `attnjax.train.pruning`

Both act on the kernels: every parameter named "kernel" with at least 2 dimensions (dense and
convolution weights; embeddings, biases and norms stay as they are). Each kernel W_l gets its own
trained parameter, kept among the model's under `params[PARAM]` at the kernel's module path (so
the optimizer trains it and checkpoints keep it):

  dqa    α_l [K], initialized by eq. 7      W_l → Σ_k a_k Q_k(W_l),  a = softmax(α_l / std(α_l) / T(t))
         + λ Σ_l gᵀ a(α_l) / S (eq. 6), S the model's parameter count, T(t) cooled exponentially
         from init_temperature at step 0 to final_temperature at the run's last step (eq. 5)
  aswl   a_l [], 0.5                       W_l → clip(a_l, 0.01, 1) · prune(W_l, p_l),
         p_l = (1 - clip(a_l))^α, + decay · (kept fraction - r)²

ASWL's pruning is straight-through: the gradient at the sparse weights updates the dense ones (the
reference code's rule), so a pruned weight can grow back. The reference multiplies a layer's
output by a_l; here a_l scales the kernel, which is the same for a layer without bias and leaves
a bias unscaled. Evaluation uses the same effective weights, and `export` gives the plain
parameters of the quantized / pruned model to load into the model as usual.

  check_config(cfg)                               raises ValueError naming the bad field
  extra_params(cfg, params)                       {PARAM: ...} to add to the model's params
  split_params(params)                            (the model's params, the method's)
  effective_params(cfg, params, extra, step, num_steps)   the kernels the forward pass uses
  penalty(cfg, params, extra, step, num_steps)    the term added to the training loss
  export(cfg, params, step, num_steps)            effective params without PARAM, for inference
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp

from attnjax import catalog
from attnjax.train import pruning
from attnjax.train import quantization

__all__ = ["PARAM", "WEIGHT_METHODS", "check_config", "effective_params", "export", "extra_params",
           "kernel_paths", "penalty", "split_params"]

PARAM = "weight_method"
# name -> {setting: default}
WEIGHT_METHODS = {
    "dqa": {"strength": 1.0, "bits": tuple(quantization.PAPER_BITS),
            "penalty": tuple(quantization.PAPER_PENALTY), "init_temperature": 100.0,
            "final_temperature": 0.03},
    "aswl": {"decay": 5.0, "pruning_factor": 1.0, "target": 0.0},
}
_FIELD = "train.weight_method"
Params = Mapping[str, Any]


def _setting(cfg: Mapping[str, Any], key: str) -> Any:
  return cfg.get(key, WEIGHT_METHODS[cfg["name"]][key])


def _positive(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0


def check_config(cfg: Mapping[str, Any]) -> None:
  """Checks a `train.weight_method` setting.

  Raises:
    ValueError: naming the bad field.
  """
  if not hasattr(cfg, "get"):
    raise ValueError(f"{_FIELD}: a dict {{'name', ...settings}} or None, got {cfg!r}")
  name = cfg.get("name", None)
  if name not in WEIGHT_METHODS:
    raise ValueError(f"{_FIELD}.name: unknown weight method {name!r}; known: "
                     f"{sorted(WEIGHT_METHODS)}")
  unknown = sorted(set(cfg.keys()) - {"name", *WEIGHT_METHODS[name]})
  if unknown:
    raise ValueError(f"{_FIELD}: {unknown} are not settings of {name!r}; it takes "
                     f"{list(WEIGHT_METHODS[name])}")
  if name == "dqa":
    bits, g = tuple(_setting(cfg, "bits")), tuple(_setting(cfg, "penalty"))
    whole = all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in bits)
    if len(bits) < 2 or not whole or any(b2 <= b1 for b1, b2 in zip(bits[:-1], bits[1:], strict=True)):
      raise ValueError(f"{_FIELD}.bits: at least 2 strictly increasing bit widths >= 1 are "
                       f"needed, got {list(bits)}")
    if len(g) != len(bits) or not all(isinstance(x, (int, float)) for x in g):
      raise ValueError(f"{_FIELD}.penalty: one number per bit width ({len(bits)}) is needed, got "
                       f"{list(g)}")
    for key in ("strength", "init_temperature", "final_temperature"):
      if not _positive(_setting(cfg, key)):
        raise ValueError(f"{_FIELD}.{key}: a number > 0 is needed, got {cfg.get(key)!r}")
  else:
    for key in ("decay", "pruning_factor"):
      if not _positive(_setting(cfg, key)):
        raise ValueError(f"{_FIELD}.{key}: a number > 0 is needed, got {cfg.get(key)!r}")
    if not 0 <= _setting(cfg, "target") <= 1:
      raise ValueError(f"{_FIELD}.target: a kept fraction in [0, 1] is needed, got "
                       f"{cfg.get('target')!r}")


def kernel_paths(params: Params) -> list[tuple[str, ...]]:
  """The module paths of the kernels the methods act on (leaves named "kernel", ndim >= 2)."""
  flat = traverse_util.flatten_dict(dict(params))
  return [k[:-1] for k, v in flat.items() if k[-1] == "kernel" and jnp.ndim(v) >= 2]


def extra_params(cfg: Optional[Mapping[str, Any]], params: Params) -> dict[str, Any]:
  """`{PARAM: nested {module path: α_l or a_l}}` for the kernels of `params` (unboxed), or {}."""
  if not cfg:
    return {}
  paths = kernel_paths(params)
  if not paths:
    raise ValueError(f"{_FIELD}: {cfg['name']!r} acts on parameters named 'kernel' with >= 2 "
                     "dimensions, and the model has none")
  if cfg["name"] == "dqa":
    init = quantization.init_alpha(tuple(_setting(cfg, "bits")))
  else:
    init = jnp.float32(pruning.ATTENTION_INIT)
  return {PARAM: traverse_util.unflatten_dict({p: init for p in paths})}


def split_params(params: Params) -> tuple[dict[str, Any], dict[str, Any]]:
  """`(the model's params, the method's: {} or the tree under PARAM)`."""
  return {k: v for k, v in params.items() if k != PARAM}, dict(params.get(PARAM, {}))


def _temperature(cfg: Mapping[str, Any], step: Any, num_steps: int) -> jax.Array:
  schedule = quantization.temperature_schedule(float(_setting(cfg, "init_temperature")),
                                               float(_setting(cfg, "final_temperature")),
                                               max(int(num_steps), 1))
  return schedule(step)


def _ste_prune(w: jax.Array, ratio: jax.Array) -> jax.Array:
  """Magnitude-pruned w in the forward pass, identity in the backward pass."""
  sparse = jnp.where(pruning.magnitude_mask(w, ratio), w, jnp.zeros_like(w))
  return w + jax.lax.stop_gradient(sparse - w)


@catalog.serves(169, 230, kind="training", name="attnjax.train.weight_methods.effective_params")
def effective_params(cfg: Optional[Mapping[str, Any]], params: Params, extra: Params, step: Any,
                     num_steps: int) -> dict[str, Any]:
  """`params` (the model's) with each kernel replaced by its quantized (dqa) or scaled sparse
  (aswl) version at training step `step` of `num_steps` (module docstring)."""
  if not cfg:
    return dict(params)
  flat = traverse_util.flatten_dict(dict(params))
  own = traverse_util.flatten_dict(dict(extra))
  if cfg["name"] == "dqa":
    temperature = _temperature(cfg, step, num_steps)
    bits = tuple(_setting(cfg, "bits"))
  factor = float(_setting(cfg, "pruning_factor")) if cfg["name"] == "aswl" else 1.0
  for path in kernel_paths(params):
    w, theta = flat[path + ("kernel",)], own[path]
    if cfg["name"] == "dqa":
      new = quantization.dqa_quantize(w.astype(jnp.float32), theta, temperature, bits)
    else:
      ratio = pruning.pruning_ratios(theta, factor)
      new = pruning.layer_scale(theta) * _ste_prune(w.astype(jnp.float32), ratio)
    flat[path + ("kernel",)] = new.astype(w.dtype)
  return traverse_util.unflatten_dict(flat)


def penalty(cfg: Optional[Mapping[str, Any]], params: Params, extra: Params, step: Any,
            num_steps: int) -> jax.Array:
  """The method's term of the training loss (eq. 6 for dqa; ASWL's kept-fraction penalty)."""
  if not cfg:
    return jnp.float32(0)
  own = traverse_util.flatten_dict(dict(extra))
  if cfg["name"] == "dqa":
    size = sum(int(jnp.size(v)) for v in jax.tree.leaves(params))
    return quantization.bitwidth_penalty(list(own.values()), _temperature(cfg, step, num_steps),
                                         size, float(_setting(cfg, "strength")),
                                         tuple(_setting(cfg, "penalty")))
  flat = traverse_util.flatten_dict(dict(params))
  paths = kernel_paths(params)
  return pruning.attention_penalty(
      [own[p] for p in paths], [flat[p + ("kernel",)] for p in paths],
      decay=float(_setting(cfg, "decay")), pruning_factor=float(_setting(cfg, "pruning_factor")),
      target=float(_setting(cfg, "target")))


def export(cfg: Optional[Mapping[str, Any]], params: Params, step: Any, num_steps: int
           ) -> dict[str, Any]:
  """The plain parameters of the trained quantized / pruned model (a trainer's params, PARAM
  included, at its step), for `model.apply` outside the trainer."""
  model_params, extra = split_params(params)
  return effective_params(cfg, model_params, extra, step, num_steps)
