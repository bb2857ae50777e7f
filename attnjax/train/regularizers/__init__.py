"""Training losses on attention: regularizers on the maps a forward sows, and attention-perturbation
training (issue 16).

`train.attention_regularizer = {"name": ..., "weight": λ, ...}` makes the trainer apply the model
with the capture collection mutable and add λ · `penalty(...)` to the task loss:

  name        settings (defaults)                       paper (catalog row)
  "deceive"   impermissible_tokens: token ids (required) Pruthi et al. 2019 (#37)
              eps (1e-6)
  "entropy"   target θ (0.5), tolerance γ (0.2),        Jha & Reagen 2025 (#133)
              learn_target (False): θ per head a trained
              parameter (params["attention_regularizer_target"] `[N]`, starting at `target`), as
              the paper's reg_threshold_weights
  "diversity" -                                         Guo et al. 2023 (#222)

Used directly (no trainer flag): `adversarial` (AT / iAT and VAT / iVAT on attention-pooling
scores, #40 / #2, with `AttentionPoolingClassifier`) and `acmil` (ACMIL stochastic top-K instance
masking, #202).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import jax.numpy as jnp

from attnjax.train.regularizers import acmil, adversarial, deceive, diversity, entropy, maps
from attnjax.train.regularizers.acmil import ACMILPooling, stochastic_topk_mask
from attnjax.train.regularizers.adversarial import (AttentionPoolingClassifier, at_loss,
                                                    at_perturbation, difference_directions,
                                                    iat_loss, iat_perturbation, ivat_loss,
                                                    ivat_perturbation, vat_loss, vat_perturbation)
from attnjax.train.regularizers.deceive import deception_penalty, impermissible_mass
from attnjax.train.regularizers.diversity import attention_diversity_loss, pairwise_row_cosine
from attnjax.train.regularizers.entropy import entropy_band_penalty, row_entropy
from attnjax.train.regularizers.maps import sown_maps

__all__ = ["acmil", "ACMILPooling", "adversarial", "at_loss", "at_perturbation",
           "attention_diversity_loss", "AttentionPoolingClassifier", "check_config", "deceive",
           "deception_penalty", "difference_directions", "diversity", "entropy", "entropy_band_penalty",
           "extra_params", "iat_loss", "iat_perturbation", "impermissible_mass", "ivat_loss",
           "ivat_perturbation", "maps", "pairwise_row_cosine", "penalty", "REGULARIZERS", "row_entropy",
           "sown_maps", "split_params", "stochastic_topk_mask", "TARGET_PARAM", "vat_loss",
           "vat_perturbation"]

# name -> the settings it accepts besides "name" and "weight".
REGULARIZERS = {"deceive": ("impermissible_tokens", "eps"),
                "entropy": ("target", "tolerance", "learn_target"), "diversity": ()}
# The trained per-head entropy targets' name among the model's parameters (`learn_target`).
TARGET_PARAM = "attention_regularizer_target"
_FIELD = "train.attention_regularizer"


def check_config(reg: Mapping[str, Any]) -> None:
  """Checks a `train.attention_regularizer` setting.

  Raises:
    ValueError: naming the bad field.
  """
  if not hasattr(reg, "get"):
    raise ValueError(f"{_FIELD}: a dict {{'name', 'weight', ...}} or None, got {reg!r}")
  name = reg.get("name", None)
  if name not in REGULARIZERS:
    raise ValueError(f"{_FIELD}.name: unknown attention regularizer {name!r}; known: "
                     f"{sorted(REGULARIZERS)}")
  weight = reg.get("weight", None)
  if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
    raise ValueError(f"{_FIELD}.weight: a number >= 0 is needed, got {weight!r}")
  unknown = sorted(set(reg.keys()) - {"name", "weight", *REGULARIZERS[name]})
  if unknown:
    raise ValueError(f"{_FIELD}: {unknown} are not settings of {name!r}; it takes "
                     f"{list(REGULARIZERS[name])}")
  if name == "deceive":
    tokens = reg.get("impermissible_tokens", None)
    if (not isinstance(tokens, (list, tuple)) or not tokens
        or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens)):
      raise ValueError(f"{_FIELD}.impermissible_tokens: a non-empty list of token ids >= 0 is "
                       f"needed, got {tokens!r}")
    if not 0 < reg.get("eps", 1e-6) < 1:
      raise ValueError(f"{_FIELD}.eps: must be in (0, 1), got {reg.get('eps')!r}")
  if name == "entropy":
    if not 0 <= reg.get("target", 0.5) <= 1:
      raise ValueError(f"{_FIELD}.target: a fraction of the maximum entropy in [0, 1] is needed, "
                       f"got {reg.get('target')!r}")
    if not 0 <= reg.get("tolerance", 0.2) < 1:
      raise ValueError(f"{_FIELD}.tolerance: must be in [0, 1), got {reg.get('tolerance')!r}")
    if not isinstance(reg.get("learn_target", False), bool):
      raise ValueError(f"{_FIELD}.learn_target: True or False, got {reg.get('learn_target')!r}")


def extra_params(reg: Optional[Mapping[str, Any]], num_heads: int) -> dict[str, jnp.ndarray]:
  """Parameters the regularizer trains beside the model's (merged into its "params"): the
  per-head entropy targets with `learn_target`, else none."""
  if not reg or reg["name"] != "entropy" or not reg.get("learn_target", False):
    return {}
  return {TARGET_PARAM: jnp.full((num_heads,), float(reg.get("target", 0.5)), jnp.float32)}


def split_params(params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """`(the model's params, the regularizer's extra params)`."""
  ours = {k: v for k, v in params.items() if k == TARGET_PARAM}
  return {k: v for k, v in params.items() if k != TARGET_PARAM}, ours


def penalty(reg: Mapping[str, Any], state: Any, inputs: jnp.ndarray,
            extra: Optional[Mapping[str, jnp.ndarray]] = None) -> jnp.ndarray:
  """The unweighted regularizer named by `reg` on the maps in `state` (the mutable collections of
  `apply(..., mutable=[CAPTURE])`); `inputs` `[B, T]` token ids locate "deceive"'s impermissible
  keys (self-attention: key s is input token s); `extra`: its trained parameters
  (`extra_params`)."""
  weights, logits = sown_maps(state)
  name = reg["name"]
  if name == "deceive":
    ids = jnp.asarray(list(reg["impermissible_tokens"]), inputs.dtype)
    mask = jnp.isin(inputs, ids)
    if any(w.shape[-1] != mask.shape[-1] for w in weights):
      raise ValueError(f"{_FIELD}: 'deceive' needs self-attention maps over the {mask.shape[-1]} "
                       f"input tokens; got key lengths {[w.shape[-1] for w in weights]}")
    return deception_penalty(weights, mask, eps=float(reg.get("eps", 1e-6)))
  if name == "entropy":
    target = (extra or {}).get(TARGET_PARAM, float(reg.get("target", 0.5)))
    return entropy_band_penalty(weights, logits, target=target,
                                tolerance=float(reg.get("tolerance", 0.2)))
  if name == "diversity":
    return attention_diversity_loss(weights)
  raise ValueError(f"{_FIELD}.name: unknown attention regularizer {name!r}; known: "
                   f"{sorted(REGULARIZERS)}")
