"""cpfx: context parallelism for diffusion transformers, as FX graph passes."""

from __future__ import annotations

import torch._logging._internal as _torch_logging

from cpfx import ops as _ops  # noqa: F401  (registers torch.ops.cpfx.*)
from cpfx import p2p as _p2p  # noqa: F401
from cpfx.api import parallelize, sent_bytes_per_call
from cpfx.backend import backend
from cpfx.config import ParallelConfig
from cpfx.debug import counters, reset_counters
from cpfx.diagnose import diagnose
from cpfx.errors import (
    CommunicationError,
    ConfigError,
    CpfxError,
    CpfxWarning,
    InputError,
    PassError,
    RankDivergenceError,
    RecompileLimitError,
    UnsupportedPatternError,
    VerificationError,
)
from cpfx.explain import explain
from cpfx.kernels import fp8 as _fp8  # noqa: F401

try:  # TORCH_LOGS=+cpfx turns on cpfx's loggers like torch's own
    _torch_logging.register_log("cpfx", ["cpfx"])
except Exception:  # noqa: BLE001 - logging setup must never break import
    pass

__all__ = [
    "CommunicationError",
    "ConfigError",
    "CpfxError",
    "CpfxWarning",
    "InputError",
    "ParallelConfig",
    "PassError",
    "RankDivergenceError",
    "RecompileLimitError",
    "UnsupportedPatternError",
    "VerificationError",
    "backend",
    "counters",
    "diagnose",
    "explain",
    "parallelize",
    "reset_counters",
    "sent_bytes_per_call",
]
