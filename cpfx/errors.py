"""Exceptions and warnings cpfx raises; each message says what failed, where, and what to change."""

from __future__ import annotations


class CpfxError(RuntimeError):
    """Base class of every error cpfx raises on purpose."""


class ConfigError(CpfxError, ValueError):
    """A `ParallelConfig`, mesh or process-group setting is invalid."""


class InputError(CpfxError, ValueError):
    """A call's inputs cannot run as given (a tensor on the meta device, or on another device type
    than the model); raised on every rank before any collective, naming the inputs."""


class UnsupportedPatternError(CpfxError):
    """The graph contains a pattern cpfx cannot rewrite exactly; it refuses instead of guessing."""


class RankDivergenceError(CpfxError):
    """Ranks would issue different collectives (or got different inputs): running on would hang."""


class PassError(CpfxError):
    """A graph pass failed; wraps the original exception with the pass name."""


class VerificationError(CpfxError):
    """`ParallelConfig(verify=True)`: a value on some rank differs from its slice of the
    single-process value; names the first op (in graph order) where that happens."""


class CommunicationError(CpfxError):
    """A collective failed (a peer died, stalled past the timeout, or the group is dead); chained to
    the original error, naming this rank, the peer or group when known, and the collective."""


class RecompileLimitError(CpfxError):
    """A parallelized model needs more compiled variants than `ParallelConfig.max_recompiles`;
    Dynamo would otherwise fall back to eager (unparallelized) code silently."""


class CpfxWarning(UserWarning):
    """Something ran, but not the way cpfx promises (e.g. attention outside cpfx's graphs, which
    every rank computed in full)."""
