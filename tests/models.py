"""Test models: cpfx's built-in tiny diffusers models (plus extra ones when present)."""

from __future__ import annotations

from cpfx.tiny import BUILDERS, build, flux, qwen, wan  # noqa: F401

try:  # more model families, added as they are supported
    from tests.models_extra import EXTRA_BUILDERS

    BUILDERS.update(EXTRA_BUILDERS)
except ImportError:
    pass
