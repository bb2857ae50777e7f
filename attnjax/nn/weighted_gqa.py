"""Weighted grouped-query attention (WGQA): each group's shared key/value head is a learned weighted
combination of its member heads (Flax Linen).

GQA (Ainslie et al., arXiv:2305.13245) converts multi-head attention with N key/value heads into one
with K < N by mean-pooling the projections of each group of G = N / K heads; WGQA keeps the N member
heads' projections `W_{k,g} [D, H]` (and biases `b_{k,g} [H]`) during fine-tuning and learns the
combination instead of fixing it to the mean:

    K_k = Σ_g w_{k,g} ⊙ (x W_{k,g} + b_{k,g})          (the same for values, with their own weights)

The weights start at 1/G (mean pooling: at initialization the layer is the GQA conversion) and train
with the rest. `weighting` chooses their form:

  "head"     one scalar per member head, `w [K, G]` (WGQA);
  "channel"  one weight per member head and output channel, `w [K, G, H]`;
  "feature"  one weight per member head and input feature, `w [K, G, D]`:
             K_k = Σ_g (x ⊙ w_{k,g}) W_{k,g} + mean_g b_{k,g}.

"head" is the paper's WGQA. The two vector forms weight each member's projection matrix
column-wise and row-wise (our reading of the paper's column / row variants; its T5 models have no
projection biases, so the "feature" form's mean bias is this layer's choice).

Every form is linear in the member projections, so it folds into one projection per group,
`W_k = Σ_g w_{k,g} ⊙ W_{k,g}` (broadcast over the weighted axis), and that is how the layer
computes it: the folded kernels are the 'key' / 'value' kernels of a plain
`attnjax.nn.MultiHeadAttention(num_kv_heads=K)`, which does the rest (any registered mechanism,
RoPE, decoding with a K-head cache). After fine-tuning, `fold(params)` returns that attention's
parameters: inference costs exactly GQA's. `from_mha(params)` turns a trained MHA's parameters (N
key/value heads) into this layer's, at the mean-pooling initialization.

Parameters: 'key' and 'value' (`kernel [D_kv, N, H]`, `bias [N, H]`, the member heads, named and
shaped as an MHA's), 'key_weights' and 'value_weights', and 'attention' (the inner
`MultiHeadAttention`'s parameters except its key/value projections: 'query', 'out', a mechanism's
learned arrays). The inner attention's other collections ('cache', 'buffers') sit under 'attention'.
Only the inputs the mechanism reads get member heads.

Paper: Chinnakonduru and Mohapatra, "Weighted Grouped Query Attention in Transformers",
arXiv:2407.10855.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax import catalog
from attnjax.nn.attention import MultiHeadAttention

__all__ = ["WeightedGroupedQueryAttention", "WEIGHTINGS"]

WEIGHTINGS = ("head", "channel", "feature")
_PROJECTIONS = (("key", "k"), ("value", "v"))
_HIGHEST = jax.lax.Precision.HIGHEST
_NAME = "WeightedGroupedQueryAttention"


def _weight_shape(weighting: str, K: int, G: int, H: int, D: int) -> tuple[int, ...]:
  return {"head": (K, G), "channel": (K, G, H), "feature": (K, G, D)}[weighting]


def _combine(kernel, bias, weights, weighting: str, K: int):
  """Folded `(kernel [D, K, H], bias [K, H] or None)` of member heads `kernel [D, N, H]`,
  `bias [N, H]` (or None) under the combination `weights` (module docstring)."""
  D, N, H = kernel.shape
  members = kernel.reshape(D, K, N // K, H)
  spec = {"head": "kg", "channel": "kgh", "feature": "kgd"}[weighting]
  folded = jnp.einsum(f"dkgh,{spec}->dkh", members, weights, precision=_HIGHEST)
  if bias is None:
    return folded, None
  member_bias = bias.reshape(K, N // K, H)
  if weighting == "feature":
    # Input-feature weights act before the projection; the bias has no input feature to weight.
    return folded, jnp.mean(member_bias, axis=1)
  return folded, jnp.einsum(f"kgh,{spec}->kh", member_bias, weights, precision=_HIGHEST)


class _MemberHeads(nn.Module):
  """The N member heads' projection parameters, initialized as `nn.DenseGeneral` initializes an
  MHA's key/value projection (on the flattened `[D, N·H]` shape)."""
  heads: int
  head_dim: int
  use_bias: bool
  kernel_init: Any
  bias_init: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, features: int):
    width = self.heads * self.head_dim
    kernel = self.param("kernel", lambda key, shape, dtype: self.kernel_init(
        key, (features, width), dtype).reshape(shape), (features, self.heads, self.head_dim),
                        self.param_dtype)
    bias = None
    if self.use_bias:
      bias = self.param("bias", lambda key, shape, dtype: self.bias_init(
          key, (width,), dtype).reshape(shape), (self.heads, self.head_dim), self.param_dtype)
    return kernel, bias


@catalog.serves(49, kind="layer")
class WeightedGroupedQueryAttention(MultiHeadAttention):
  """Grouped-query attention whose K shared key/value heads are learned combinations of N member
  heads (module docstring). Every attribute of `MultiHeadAttention` means the same here
  (`num_kv_heads` is K, the number of groups; it must divide `num_heads`), plus:

  Attributes:
    weighting: "head" (a scalar per member head), "channel" (per member head and output channel)
      or "feature" (per member head and input feature).
  """
  weighting: str = "head"

  def _sizes(self, features: int) -> tuple[int, int, int, int]:
    if self.weighting not in WEIGHTINGS:
      raise ValueError(f"{_NAME}: `weighting` must be one of {WEIGHTINGS}, got {self.weighting!r}")
    N, K, H = self._dims(features)
    return N, K, H, N // K

  @nn.compact
  def __call__(self, inputs_q: jax.Array, inputs_kv=None, **kwargs):
    """As `MultiHeadAttention.__call__` (same arguments and returns), with the key/value
    projections folded from the member heads."""
    if jnp.ndim(inputs_q) != 3:
      raise ValueError(f"{_NAME}: `inputs_q` must have shape [B, T, D], got shape "
                       f"{jnp.shape(inputs_q)}")
    N, K, H, G = self._sizes(inputs_q.shape[-1])
    kv_in = inputs_q if inputs_kv is None else inputs_kv
    # Shared Attention's value-only layers read no keys; otherwise what the mechanism reads.
    reads = {"v"} if kwargs.get("shared_weights") is not None else self._mechanism().reads
    folded = {}
    for name, letter in _PROJECTIONS:
      if letter not in reads:
        continue
      kernel, bias = _MemberHeads(N, H, self.use_bias, self.kernel_init, self.bias_init,
                                  self.param_dtype, name=name)(kv_in.shape[-1])
      weights = self.param(f"{name}_weights", nn.initializers.constant(1.0 / G),
                           _weight_shape(self.weighting, K, G, H, kv_in.shape[-1]),
                           self.param_dtype)
      kernel, bias = _combine(kernel, bias, weights, self.weighting, K)
      folded[name] = {"kernel": kernel} if bias is None else {"kernel": kernel, "bias": bias}

    def with_folded(variables):
      return {**variables, "params": {**variables.get("params", {}), **folded}}

    def without_folded(variables):
      # The inner layer's own K-head key/value projections (drawn at init) are not stored.
      if "params" not in variables:
        return variables
      return {**variables, "params": {key: value for key, value in variables["params"].items()
                                      if key not in folded}}

    attention = nn.map_variables(MultiHeadAttention, "params", trans_in_fn=with_folded,
                                 trans_out_fn=without_folded, init=self.is_initializing(),
                                 mutable=self.is_initializing())
    return attention(**self._attention_fields(), name="attention")(inputs_q, inputs_kv, **kwargs)

  def _attention_fields(self) -> dict[str, Any]:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(MultiHeadAttention)
            if f.init and f.name not in ("parent", "name")}

  def fold(self, params: Mapping[str, Any]) -> dict[str, Any]:
    """The 'params' of a plain `MultiHeadAttention` with this layer's settings (`num_kv_heads` = K)
    that computes the same outputs: the inner attention's parameters with 'key' / 'value' the
    folded member projections. `params` is this layer's 'params' collection."""
    if "attention" not in params:
      raise ValueError(f"{_NAME}.fold: expected this layer's 'params' collection (with "
                       f"'attention'), got keys {sorted(params)}")
    out = dict(params["attention"])
    for name, _ in _PROJECTIONS:
      if name not in params:
        continue
      members = params[name]
      D, N, H = members["kernel"].shape
      K = self._groups(N)
      weights = params[f"{name}_weights"]
      expected = _weight_shape(self.weighting, K, N // K, H, D)
      if weights.shape != expected:
        raise ValueError(f"{_NAME}.fold: `{name}_weights` must have shape {expected} for "
                         f"weighting {self.weighting!r}, got {weights.shape}")
      kernel, bias = _combine(members["kernel"], members.get("bias"), weights, self.weighting, K)
      out[name] = {"kernel": kernel} if bias is None else {"kernel": kernel, "bias": bias}
    return out

  def from_mha(self, params: Mapping[str, Any]) -> dict[str, Any]:
    """This layer's 'params' from those of a trained `MultiHeadAttention` with one key/value head
    per query head (N): its key/value projections become the member heads, the weights start at
    the mean (1/G: the GQA conversion), and everything else ('query', 'out', ...) moves under
    'attention'."""
    out = {"attention": {key: value for key, value in params.items()
                         if key not in dict(_PROJECTIONS)}}
    for name, _ in _PROJECTIONS:
      if name not in params:
        continue
      kernel = params[name]["kernel"]
      if jnp.ndim(kernel) != 3 or kernel.shape[1] != self.num_heads:
        raise ValueError(f"{_NAME}.from_mha: `{name}/kernel` must have shape [D, N, H] with N = "
                         f"num_heads = {self.num_heads} key/value heads, got "
                         f"{jnp.shape(kernel)}")
      D, N, H = kernel.shape
      K = self._groups(N)
      G = N // K
      out[name] = dict(params[name])
      out[f"{name}_weights"] = jnp.full(_weight_shape(self.weighting, K, G, H, D), 1.0 / G,
                                        kernel.dtype)
    return out

  def _groups(self, N: int) -> int:
    K = N if self.num_kv_heads is None else self.num_kv_heads
    if self.weighting not in WEIGHTINGS:
      raise ValueError(f"{_NAME}: `weighting` must be one of {WEIGHTINGS}, got {self.weighting!r}")
    if K <= 0 or N % K:
      raise ValueError(f"{_NAME}: `num_kv_heads` (K = {K}) must divide the {N} member heads")
    return K
