"""User-facing configuration: one frozen dataclass, validated before any work."""

from __future__ import annotations

import dataclasses
from typing import Literal

from cpfx.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """How cpfx parallelizes a model. Every field has a safe default."""

    ring_rotate: Literal["allgather", "p2p"] = "p2p"
    """How ring attention moves K/V between ranks. "p2p" (default): `batch_isend_irecv` to the
    neighbour, the next block in flight while the current block computes, two K/V blocks resident.
    "allgather": one all-gather of all K/V blocks, then the loop (simpler, N blocks resident)."""

    head_padding: Literal["auto", "pad", "uneven"] = "auto"
    """Heads not divisible by the Ulysses degree: "pad" zero-pads heads before the all-to-all;
    "uneven" sends uneven head groups (padding-free; needs an evenly divisible sequence);
    "auto" picks "uneven" when the sequence divides evenly, else "pad"."""

    fp8_comm: bool = False
    """Send Q, V and O of Ulysses all-to-alls as float8 e4m3 with per-(token, head) scales; K stays
    in the model dtype. Changes results by FP8 rounding (relative L2 error well under 1%)."""

    async_qkv: bool = True
    """Schedule each all-to-all as early as its input is ready and wait right before first use, so
    the K/V projections overlap Q's transfer. Never changes results."""

    compile: bool = False
    """Hand the rewritten graph to inductor. Default: run it eagerly as an FX GraphModule."""

    dump_dir: str | None = None
    """Write per-rank, per-pass readable graph dumps here (also set by CPFX_DUMP_DIR)."""

    skip_passes: tuple[str, ...] = ()
    """Pass names to skip, for bisecting a problem. Skipping a required pass raises."""

    check_collectives: bool = True
    """Compare a fingerprint of every rank's collective sequence once per compile; raise with a
    diff on mismatch instead of hanging."""

    check_inputs: bool = False
    """Verify (once per call, with one small all-gather) that all ranks received the same inputs."""

    timeout_s: float = 300.0
    """Collective timeout used for the consistency checks; a dead or stalled rank raises within it."""

    max_recompiles: int = 8
    """Hard cap on graph recompilations (new shapes/dtypes) per parallelized model."""

    verify: bool = False
    """On the first call of each compiled graph, also run the unparallelized graph on the same
    inputs and compare every value this rank holds with its slice of the single-process value;
    raise `cpfx.VerificationError` naming the first op that differs. Costs one single-process
    forward and keeps all of its intermediate values in memory for that call. Also set by
    CPFX_VERIFY=1."""

    replicate: tuple[str, ...] = ()
    """Module paths (e.g. "transformer_blocks.3.attn") whose ops cpfx must not shard: their inputs
    are gathered and they run on the whole sequence on every rank. An explicit override of the
    inferred plan, for bisecting or for modules cpfx shards badly."""

    def __post_init__(self) -> None:
        if self.ring_rotate not in ("allgather", "p2p"):
            raise ConfigError(
                f"ParallelConfig.ring_rotate={self.ring_rotate!r}: expected 'allgather' or 'p2p'"
            )
        if self.head_padding not in ("auto", "pad", "uneven"):
            raise ConfigError(
                f"ParallelConfig.head_padding={self.head_padding!r}: expected 'auto', 'pad' or 'uneven'"
            )
        if self.timeout_s <= 0:
            raise ConfigError(f"ParallelConfig.timeout_s={self.timeout_s}: must be positive")
        if self.max_recompiles < 1:
            raise ConfigError(f"ParallelConfig.max_recompiles={self.max_recompiles}: must be >= 1")
