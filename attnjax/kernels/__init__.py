"""GPU kernels (Pallas through Triton and Mosaic GPU, and Triton through jax-triton) for the hot paths
of the core primitives. Each kernel is a named implementation in its primitive's dispatch table
(`"pallas_triton"`, `"pallas_mosaic_gpu"`, `"jax_triton"`), listed for the "gpu" platform only, so
automatic dispatch never picks it on a CPU; named explicitly on a CPU it runs in Pallas' interpret
mode (the kernel's own arithmetic, slowly: for tests). See `platform.py`.
"""
