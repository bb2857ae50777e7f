"""CPU kernels behind `jax.ffi`: `cpu_flash_attention`, the `cpu_flash` implementation of
`flex_attention` (fused flash attention in C++, `flash_attention.cc`), built by
`python -m attnjax.kernels.cpu.build` (the Makefile's test, demo and bench targets run it). Without
the built library every entry raises NotImplementedError and `flex_attention` uses `xla`."""

from attnjax.kernels.cpu.flash import available, cpu_flash_attention, unavailable_reason

__all__ = ["available", "cpu_flash_attention", "unavailable_reason"]
