"""Weight initializers that the papers' reference code gets from its framework, so a module built
here starts where the paper's does."""

from __future__ import annotations

import math

import jax

__all__ = ["torch_uniform"]


def torch_uniform(fan_in: int):
  """`U(-1/sqrt(fan_in), 1/sqrt(fan_in))` as a Flax initializer: PyTorch's default for the weights and
  biases of `nn.Linear`, `nn.Conv1d` and `nn.Conv2d` (kaiming_uniform with a = sqrt(5) reduces to this
  bound). `fan_in` is what PyTorch counts: in_features, or (C_in / groups) · kernel elements."""
  bound = 1.0 / math.sqrt(max(1, fan_in))
  return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)
