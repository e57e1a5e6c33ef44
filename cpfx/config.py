"""User-facing configuration: one frozen dataclass, validated (types and values) at construction."""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from typing import Any, Literal

from cpfx.errors import ConfigError

CHECK_INPUTS = ("always", "first", "never")


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

    qkv_all_to_all: Literal["auto", "one", "three"] = "auto"
    """Ulysses transfers of Q, K and V: "three" sends each on its own (with `async_qkv`, Q's
    transfer runs under the K/V projections); "one" sends them in one all-to-all (one call and
    one wait instead of three: less host work per attention) wherever Q and K/V share their
    tokens and heads and travel unquantized; "auto" picks "one" where Q's payload per rank is
    under 512 KiB (there the host's per-call work dominates and the overlap gains nothing) or
    `async_qkv` is off, else "three". Never changes results."""

    compile: bool = False
    """Hand the rewritten graph to inductor. Default: run it eagerly as an FX GraphModule."""

    dump_dir: str | None = None
    """Write per-rank, per-pass readable graph dumps here (also set by CPFX_DUMP_DIR), one folder
    per parallelized model (`<dump_dir>/<ModelClass>-<n>/rank<r>/graph<g>/`). Symbolic links
    inside it are refused."""

    skip_passes: tuple[str, ...] = ()
    """Pass names to skip, for bisecting a problem (a list is accepted and stored as a tuple).
    Unknown names and required passes are refused here."""

    check_collectives: bool = True
    """Once per compile, exchange every rank's collective schedule (kinds, groups, roles, dtypes,
    local shapes and split sizes) over cpfx's gloo check group and check that what each rank sends
    is what its peers expect to receive; raise `RankDivergenceError` naming ranks and shapes on a
    mismatch, before any of the graph's collectives runs."""

    check_inputs: Literal["always", "first", "never"] = "always"
    """Cross-rank input check before each call, over cpfx's gloo check group (one all-gather of a
    few hundred bytes): every call compares the call number, the model, the input shapes, dtypes
    and non-tensor values, and a hash of every input tensor's bytes ("always": one hashing pass
    over the call's inputs, a small share of a call; `benchmarks/input_check.py`), so a skipped
    call, different shapes or different values on some rank raise `RankDivergenceError` on every
    rank. "first" hashes all inputs only on the first call of each input signature and inputs of
    at most 4096 elements on later calls (cheaper, but a rank whose large inputs diverge later is
    not caught); "never" checks nothing. `True` / `False` are accepted for now as "always" /
    "never" (deprecated)."""

    timeout_s: float = 300.0
    """Timeout of cpfx's cross-rank checks and of the compiled graphs' collectives, which run on
    process groups cpfx creates (one per set of ranks): a dead or stalled rank raises
    `CommunicationError` within it. It must also cover how far the ranks' compiles drift apart
    on a first call. The user's process groups keep their own timeouts."""

    max_recompiles: int = 8
    """Dynamo's recompile limit for this model's compiled region (per frame: the model's forward
    and each resume function after a graph break); each parallelized model has its own region.
    Past it cpfx raises `RecompileLimitError` with Dynamo's reason instead of running eagerly.
    With `regional=True` each block class is a region and may hold 4 graphs per input signature
    (whole inputs, token shards of each layout it is handed): its limit is 4x this."""

    strict: bool = False
    """Attention that runs outside cpfx's graphs (graph breaks, `torch.compiler.disable`,
    checkpointed regions, custom processors) is computed in full on every rank. Default: warn
    (`CpfxWarning`) on the first call of each input signature; True: raise instead."""

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

    regional: bool = False
    """Compile each repeated block class once (the classes a diffusers model lists in
    `_repeated_blocks`, as `compile_repeated_blocks()` does; without that list, the classes of
    its ModuleLists' items that hold attention) instead of the whole model: the first
    call of a 57-block model costs about what a 2-block one does, and a new resolution recompiles
    a few small graphs (per class, one per layout of the token shards it is handed; one for whole
    inputs on the first call only: from then on the first block of a run is handed its part of
    them). Between blocks the hidden states stay sharded (`cpfx.resident.TokenShards`): the
    next block takes its shard as it is; code between the blocks (embedders, final norm, hooks
    outside the blocks) runs eagerly and all-gathers what it reads, once. A block that writes to
    its input in place leaves the write in the caller's tensor, as it would run alone. A block
    with a graph break inside gathers its outputs. Attention
    outside the repeated blocks (refiner blocks, for instance) is not parallelized (reported,
    as any attention outside cpfx's graphs). Default off: the whole-model graph keeps the
    sequence sharded from the first token-wise op to the output."""

    dynamic: bool = False
    """Capture sizes symbolically, so that a new resolution (token length, frames, batch) costs a
    small fraction of a first call: Dynamo traces with the input dims marked dynamic
    (`torch._dynamo.maybe_mark_dynamic`; dims that meet weights specialize) and does not trace
    again at a new set of sizes: cpfx plans a static graph for it (`cpfx.dynamic`). The whole
    model's graph is functionalized once, symbolically, and its size expressions evaluated per
    set of sizes; a regional block graph, small, is functionalized again per set of sizes (less
    work at the first call). The first call costs more (symbolic tracing: on a 57-block Flux with
    `regional=True`, about 1.5x the static first call; a new resolution then costs about a fifth
    of it). Default off: every size static, so a new resolution is a full recompile. Results are
    the same either way."""

    def __post_init__(self) -> None:
        _choice(self, "ring_rotate", ("allgather", "p2p"))
        _choice(self, "head_padding", ("auto", "pad", "uneven"))
        _choice(self, "qkv_all_to_all", ("auto", "one", "three"))
        for name in (
            "fp8_comm", "async_qkv", "compile", "check_collectives", "strict", "verify", "regional",
            "dynamic",
        ):
            if type(getattr(self, name)) is not bool:
                raise ConfigError(
                    f"ParallelConfig.{name}={getattr(self, name)!r}: expected True or False "
                    f"(a bool, not {type(getattr(self, name)).__name__})"
                )
        self._check_dump_dir()
        self._check_inputs_field()
        self._check_timeout()
        m = self.max_recompiles
        if type(m) is not int or m < 1:
            raise ConfigError(f"ParallelConfig.max_recompiles={m!r}: expected an int >= 1")
        self._check_skip_passes()
        self._check_replicate()

    def _check_replicate(self) -> None:
        r = self.replicate
        if isinstance(r, list):
            r = tuple(r)
            object.__setattr__(self, "replicate", r)
        if not isinstance(r, tuple) or not all(isinstance(x, str) and x for x in r):
            raise ConfigError(
                f"ParallelConfig.replicate={r!r}: expected a tuple of module paths, "
                "e.g. ('transformer_blocks.3.attn',)"
            )

    def _check_dump_dir(self) -> None:
        d = self.dump_dir
        if d is None:
            return
        if isinstance(d, os.PathLike):
            object.__setattr__(self, "dump_dir", os.fspath(d))
        elif not isinstance(d, str) or not d:
            raise ConfigError(
                f"ParallelConfig.dump_dir={d!r}: expected a non-empty path (str or os.PathLike) "
                "or None"
            )

    def _check_inputs_field(self) -> None:
        v = self.check_inputs
        if type(v) is bool:
            warnings.warn(
                f"ParallelConfig(check_inputs={v}) is deprecated: use "
                f"check_inputs={'always' if v else 'never'!r}",
                DeprecationWarning,
                stacklevel=4,
            )
            object.__setattr__(self, "check_inputs", "always" if v else "never")
            return
        _choice(self, "check_inputs", CHECK_INPUTS)

    def _check_timeout(self) -> None:
        t = self.timeout_s
        if type(t) not in (int, float) or not math.isfinite(t) or t <= 0:
            raise ConfigError(
                f"ParallelConfig.timeout_s={t!r}: expected a finite positive number of seconds"
            )
        object.__setattr__(self, "timeout_s", float(t))

    def _check_skip_passes(self) -> None:
        s = self.skip_passes
        if isinstance(s, list):
            s = tuple(s)
            object.__setattr__(self, "skip_passes", s)
        if not isinstance(s, tuple) or not all(isinstance(x, str) for x in s):
            raise ConfigError(
                f"ParallelConfig.skip_passes={s!r}: expected a tuple of pass names, "
                "e.g. ('overlap',)"
            )
        if not s:
            return
        known, required = _pass_names(self)
        unknown = [x for x in s if x not in known]
        if unknown:
            raise ConfigError(
                f"ParallelConfig.skip_passes: unknown pass name(s) {unknown}; passes: {known}"
            )
        bad = [x for x in s if x in required]
        if bad:
            raise ConfigError(
                f"ParallelConfig.skip_passes: {bad} cannot be skipped (required); skippable: "
                f"{[n for n in known if n not in required]}"
            )


def _choice(cfg: ParallelConfig, name: str, allowed: tuple[str, ...]) -> None:
    v = getattr(cfg, name)
    if not isinstance(v, str) or v not in allowed:
        raise ConfigError(
            f"ParallelConfig.{name}={v!r}: expected one of {', '.join(repr(a) for a in allowed)}"
        )


def _pass_names(cfg: ParallelConfig) -> tuple[list[str], tuple[str, ...]]:
    """Every pass the pipeline can contain (with all optional passes on), and the required ones."""
    from cpfx import pipeline

    probe: Any = dataclasses.replace(
        cfg, skip_passes=(), fp8_comm=True, async_qkv=True, check_collectives=True, compile=True
    )
    passes = pipeline.build_pipeline(probe)
    return [p.name for p in passes], tuple(p.name for p in passes if p.required)
