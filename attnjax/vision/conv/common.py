"""Helpers shared by the convolutional attention modules (`attnjax.vision.conv`): PyTorch's default
initializer for convolution weights and biases, which the papers' reference code keeps."""

from __future__ import annotations

import math

import jax

__all__ = ["torch_uniform"]


def torch_uniform(fan_in: int):
  """`U(-1/sqrt(fan_in), 1/sqrt(fan_in))`, PyTorch's default for `nn.Conv2d` weights and biases
  (kaiming_uniform with a = sqrt(5) reduces to this bound), as a Flax initializer."""
  bound = 1.0 / math.sqrt(max(1, fan_in))
  return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)
