"""Test fixtures shipped with cpfx: the diffusers model zoo (`cpfx.testing.zoo`)."""
