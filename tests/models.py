"""Test models: cpfx's tiny diffusers models (`cpfx.tiny`)."""

from __future__ import annotations

from cpfx.tiny import BUILDERS, EXTRA, build, flux, qwen, wan  # noqa: F401
