"""cpfx compute kernels (Triton on CUDA, torch reference elsewhere)."""
