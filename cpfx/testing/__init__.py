"""Fixtures shipped with cpfx, for its tests, benchmarks and examples (not imported by the core):
tiny random models of the seed families (`cpfx.testing.tiny`), every diffusers transformer class
as a tiny case (`cpfx.testing.zoo`), and a local launcher of N ranks (`cpfx.testing.launch`)."""
