"""Exceptions raised by cpfx. Every message says what failed, where, and what to change."""

from __future__ import annotations


class CpfxError(RuntimeError):
    """Base class of every error cpfx raises on purpose."""


class ConfigError(CpfxError, ValueError):
    """A `ParallelConfig`, mesh or process-group setting is invalid."""


class UnsupportedPatternError(CpfxError):
    """The graph contains a pattern cpfx cannot rewrite exactly; it refuses instead of guessing."""


class RankDivergenceError(CpfxError):
    """Ranks would issue different collectives (or got different inputs): running on would hang."""


class PassError(CpfxError):
    """A graph pass failed; wraps the original exception with the pass name."""


class VerificationError(CpfxError):
    """`ParallelConfig(verify=True)`: a value on some rank differs from its slice of the
    single-process value; names the first op (in graph order) where that happens."""
