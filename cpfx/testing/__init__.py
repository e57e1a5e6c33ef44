"""Fixtures shipped with cpfx, for its tests, benchmarks, examples and `python -m cpfx` (the
library never imports them): tiny random models of the seed families (`cpfx.testing.tiny`), every
diffusers transformer class as a tiny case (`cpfx.testing.zoo`), local gloo ranks
(`cpfx.testing.launch`: `spawn_ranks`, the persistent `Pool`) and the parity check every rank
runs (`cpfx.testing.parity`)."""
