"""cpfx: context parallelism for diffusion transformers."""
