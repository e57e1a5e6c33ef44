"""What happens at each call of a parallelized model: the checks that keep it from going silently
wrong or silently unparallelized.

Per call, in order (all of it under one lock per set of ranks, so two threads never interleave
their collectives):

1. a group that failed in an earlier call is reported again (`CommunicationError`);
2. grad mode with parameters or inputs that require grad is refused (`CpfxError`) where
   gradients are not exact (`cpfx.training.refuse_unsupported`: fp8 payloads);
3. the cross-rank input check (`check_inputs`): one all-gather of a fixed-size int64 header
   (model, cpfx's call number and the caller's, input shapes/dtypes/values, inputs on the wrong
   device, a hash of every input's bytes under the default "always") over cpfx's gloo group; any
   difference raises `RankDivergenceError` on every rank before the model's first collective, and
   an input on the meta device or on another device type than the model `InputError`;
4. the compiled call, with Dynamo's recompile limit turned into `RecompileLimitError`, collective
   failures into `CommunicationError` (chained), everything else re-raised unchanged; its
   collectives run on cpfx's groups (`rankcheck.graph_group`), so a stalled peer raises within
   `timeout_s`;
5. on the first call of each input signature (and after a recompile), a `TorchDispatchMode`
   counts the attention kernels that run outside cpfx's graphs (a thread-local flag is set while
   a cpfx graph runs): `CpfxWarning`, or an error with `strict=True`. Later calls skip it.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import inspect
import itertools
import linecache
import logging
import re
import sys
import threading
import time
import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_flatten_with_path

from cpfx import dynamic, graph_utils, rankcheck, resident
from cpfx.config import ParallelConfig
from cpfx.errors import (
    CommunicationError,
    ConfigError,
    CpfxError,
    CpfxWarning,
    InputError,
    RankDivergenceError,
    RecompileLimitError,
    UnsupportedPatternError,
)
from cpfx.fastcall import op_of

log = logging.getLogger(__name__)

REGIONAL_VARIANTS = 4
"""Graphs a regional block class may need per input signature (see `Runtime.recompile_limit`)."""
SLOTS = 16
"""Inputs with their own slot in the per-call header (later ones share the last slot)."""
SMALL = 4096
"""Tensor inputs of at most this many elements (timesteps, guidance, pooled embeddings) are
hashed on every call: a rank that skipped or repeated a call differs in them."""
_DEVICES = 8
"""Header column: bit i set where input i is misplaced (`misplaced_inputs`; i < 62)."""
_CALLS = 9
"""Header column: the calls this rank's caller made of the model, this one included (`seq`, in
column 2, is cpfx's exchange number: realigned after a divergence, it is what must match)."""
_FIELDS = 10
"""int64 fields of the per-call header before the input digests."""
VALUES = 8
"""Inputs of at most this many elements (a timestep, a guidance scale) are shown by value when
their bytes differ between ranks."""
_HEADER = _FIELDS + 2 * SLOTS
_MAGIC = 0xCF0016
_MAX_DIMS = 8
_ATTENTION_OPS = frozenset(
    {
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_fused_attention_overrideable",
        "_safe_softmax",  # only SDPA's math path uses it (the other paths are fused kernels)
    }
)


class _ThreadState(threading.local):
    depth = 0
    """> 0 while a cpfx graph runs in this thread."""
    observer: Any = None


_tls = _ThreadState()


@dataclasses.dataclass
class GraphRecord:
    """One graph Dynamo handed to cpfx (one per compiled frame variant)."""

    id: int
    gm: fx.GraphModule | None
    captured_attention: int
    """`scaled_dot_product_attention` calls in the captured graph."""
    parallel_attention: int
    """Of those, rewritten into context-parallel attention."""
    whole_attention: list[str] = dataclasses.field(default_factory=list)
    """Of those, the ones cpfx left on the whole sequence on every rank (where, and why)."""
    short_attention: int = 0
    """Of those, the ones over sequences too short to split (one token): run whole, as expected."""
    reason: str | None = None
    """Dynamo's guard failure that made this a recompile (None for a frame's first graph)."""
    call: int = 0
    """The model call that compiled it."""
    runs: int = 0
    compile_id: str = ""
    """Dynamo's id of the compile that made it ("0/1", as in guard failure reasons); empty for a
    static variant of a symbolic graph (compiled by cpfx, not Dynamo)."""
    evicted: bool = False
    """A static variant dropped by the variant cache (`max_recompiles` kept per symbolic graph,
    least recently used first out); its graph is released."""
    failed: bool = False
    """Its call failed before it ever ran through: it takes no recompile slot, and its reason is
    not a recompile reason."""

    @property
    def collectives(self) -> list[str]:
        return list(self.gm.meta.get("cpfx_collectives", ())) if self.gm is not None else []

    @property
    def sent_bytes(self) -> int:
        if self.gm is None:
            return 0
        return sum(b for _, _, b in self.gm.meta.get("cpfx_sent_bytes", ()))


@dataclasses.dataclass
class AttentionReport:
    """What the observed (first) call of one input signature ran."""

    signature: str
    call: int = 0
    """The model call that was observed."""
    parallel: int = 0
    """Attentions that ran context-parallel (in cpfx graphs)."""
    outside: dict[str, int] = dataclasses.field(default_factory=dict)
    """Attention kernels that ran outside cpfx's graphs, by module path."""
    whole: dict[str, int] = dataclasses.field(default_factory=dict)
    """Attentions inside cpfx's graphs that ran on the whole sequence on every rank."""
    short: int = 0
    """Attentions over sequences too short to split (run whole on every rank, as expected)."""
    graphs_run: list[int] = dataclasses.field(default_factory=list)

    @property
    def outside_total(self) -> int:
        return sum(self.outside.values())


class _AttentionObserver(TorchDispatchMode):
    """Counts attention kernels outside cpfx's graphs. Ignores compile internals, so Dynamo
    compiles and runs its cached code exactly as without it (checked: no recompile)."""

    supports_higher_order_operators = True
    """Higher-order ops (the RNG-state wrappers of recomputed regions, ...) pass through."""

    def __init__(self, paths: dict[int, str], report: AttentionReport) -> None:
        super().__init__()
        self.paths = paths
        self.report = report

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if _tls.depth == 0 and func._overloadpacket.__name__ in _ATTENTION_OPS:
            where = _module_path(self.paths)
            self.report.outside[where] = self.report.outside.get(where, 0) + 1
        return func(*args, **(kwargs or {}))

    def ran(self, rec: GraphRecord) -> None:
        self.report.parallel += rec.parallel_attention
        for w in rec.whole_attention:
            self.report.whole[w] = self.report.whole.get(w, 0) + 1
        self.report.short += rec.short_attention
        self.report.graphs_run.append(rec.id)


def _module_path(paths: dict[int, str]) -> str:
    """The innermost module of the model on the Python stack (`self`, or diffusers' `attn`)."""
    f: Any = sys._getframe(2)
    while f is not None:
        loc = f.f_locals
        for name in ("attn", "self", "module"):
            obj = loc.get(name)
            if obj is not None and id(obj) in paths:
                return paths[id(obj)] or "<root>"
        f = f.f_back
    return "<outside the model's modules>"


class Runtime:
    """Per-model state of a parallelized model (`model._cpfx`); `cpfx.diagnose` reads it."""

    def __init__(
        self, model: torch.nn.Module, be: Callable[..., Any], config: ParallelConfig, ordinal: int
    ) -> None:
        self.model_name = type(model).__name__
        self.model_ref = model
        self.be = be
        self.info = be.mesh_info  # type: ignore[attr-defined]
        self.config = config
        self.ordinal = ordinal
        self.ranks = self.info.cp_ranks or tuple(range(self.info.world))
        self.graph_groups = [
            g for g in (self.info.cp_group, self.info.ulysses_group, self.info.ring_group) if g
        ]
        """cpfx's groups the graphs' collectives run on (their timeout is `config.timeout_s`)."""
        self.lock = rankcheck.call_lock(self.ranks)
        self.graphs: list[GraphRecord] = []
        self.pending_reasons: list[tuple[str, str]] = []
        """Dynamo's guard failures in this call: (compile id of the failed entry, reason)."""
        self.recompile_reasons: list[str] = []
        self.failed_variants = 0
        """Dynamo cache entries made by calls that failed (see `forget_failed`)."""
        self.limit_setters: list[Callable[[int], None]] = []
        """Set the per-region recompile limit of each compiled region (`compile_call`)."""
        self.seen: set[Any] = set()
        self.sig_calls: dict[Any, int] = {}
        """Calls per input signature (the first few mark size dims for Dynamo)."""
        self.reports: collections.deque[AttentionReport] = collections.deque(maxlen=32)
        """The observed calls (first of each input signature, and the one after a recompile)."""
        self.calls = 0
        self.seq = 0
        self.failed_calls = 0
        self.compiled: Callable[..., Any] | None = None
        """The Dynamo-compiled call (without these checks), for benchmarks."""
        self.patch_limit = False
        """A torch without a per-compile recompile_limit (or where cpfx cannot raise it after a
        failed call): Dynamo's global one is set around each call."""
        self._paths: dict[int, str] | None = None
        self._sig_hashes: dict[Any, int] = {}
        self._name_hash = rankcheck.text_hash(self.model_name)

    # --- compatibility with the dict this used to be --------------------------------------
    def __getitem__(self, key: str) -> Any:
        return {
            "graphs": [g.gm for g in self.graphs],
            "config": self.config,
            "mesh_info": self.info,
        }[key]

    # --- compile side --------------------------------------------------------------------
    def guard_fail(self, failure: Any) -> None:
        """Dynamo's guard_fail_fn: called (only when recompiling) with each failed guard."""
        raw = str(getattr(failure, "reason", failure))
        found = re.match(r"\s*(\d+/\d+): ", raw)
        reason = _short_reason(raw)
        code = getattr(failure, "orig_code", None)
        if code is not None:
            code = _model_code(code, self.model_ref)
            name = getattr(code, "co_qualname", code.co_name)
            where = f"{name} ({code.co_filename.rsplit('/', 1)[-1]}:{code.co_firstlineno})"
            reason = f"in {where}: {reason}"
        self.pending_reasons.append((found.group(1) if found else "", reason))

    def _take_reason(self) -> str | None:
        """The first guard failure of this call against a graph that did not fail (a failed
        variant's guards failing is no reason to recompile: that variant never ran)."""
        failed = {g.compile_id for g in self.graphs if g.failed and g.compile_id}
        reason = next((r for cid, r in self.pending_reasons if cid not in failed), None)
        self.pending_reasons.clear()
        return reason

    def backend(self, gm: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        reason = self._take_reason()
        captured = sum(1 for n in gm.graph.nodes if _is_sdpa(n))
        with self._compiling():
            fn = self.be(gm, example_inputs)
        rec = self._record(captured, reason)
        compile_id = torch._guards.CompileContext.current_compile_id()
        rec.compile_id = str(compile_id) if compile_id is not None else ""
        variants = self.be.last_variants  # type: ignore[attr-defined]
        if variants is None:
            return self._wrap_graph(fn, lambda: rec)
        # Captured with symbolic sizes: one record per static variant (a new set of sizes
        # compiles one at run time, like a recompile, without Dynamo tracing again).
        recs = {id(variants.last or next(iter(variants.variants.values()))): rec}

        def on_variant(v: Any) -> None:
            recs[id(v)] = self._record(captured, "new sizes (static variant of a symbolic graph)")

        def on_evict(v: Any) -> None:
            """A variant dropped (least recently used beyond `max_recompiles`): its graph is
            released here too; the record stays, marked evicted."""
            old = recs.pop(id(v), None)
            if old is not None and old.gm is not None:
                be_graphs = self.be.graphs  # type: ignore[attr-defined]
                be_graphs[:] = [g for g in be_graphs if g is not old.gm]
                old.gm, old.evicted = None, True

        variants.on_variant = on_variant
        variants.on_evict = on_evict
        variants.guard = self._compiling
        return self._wrap_graph(fn, lambda: recs.get(id(variants.last), rec))

    def _record(self, captured: int, reason: str | None) -> GraphRecord:
        out_gm = self.be.graphs[-1]  # type: ignore[attr-defined]
        parallel = int(out_gm.meta.get("cpfx_attention_parallel", 0))
        whole = list(out_gm.meta.get("cpfx_attention_whole", ()))
        rec = GraphRecord(
            len(self.graphs), out_gm, captured, parallel, whole, reason=reason, call=self.calls
        )
        rec.short_attention = int(out_gm.meta.get("cpfx_attention_short", 0))
        self.graphs.append(rec)
        if reason:
            self.recompile_reasons.append(reason)
            log.info("cpfx: %s graph %d is a recompile: %s", self.model_name, rec.id, reason)
        return rec

    @contextlib.contextmanager
    def _compiling(self) -> Iterator[None]:
        """Around cpfx's backend: a rank that fails before the collective-schedule exchange tells
        the others (which wait in it), so every rank raises at once."""
        rankcheck.begin_compile()
        try:
            yield
        except BaseException:
            if self.config.check_collectives and self.info.check_group is not None:
                try:
                    rankcheck.announce_failure(
                        self.info.check_group,
                        self.info.world,
                        self.config.timeout_s,
                        len(self.be.graphs),  # type: ignore[attr-defined]
                    )
                except CpfxError as e:
                    log.warning("cpfx: could not tell the other ranks about the failure: %s", e)
            raise

    def _wrap_graph(
        self, fn: Callable[..., Any], record: Callable[[], GraphRecord]
    ) -> Callable[..., Any]:
        def run(*args: Any) -> Any:
            _tls.depth += 1
            rec: GraphRecord | None = None
            t0 = time.perf_counter()
            try:
                out = fn(*args)
                rec = record()
                return out
            except CpfxError:
                raise
            except Exception as e:  # noqa: BLE001 - collective failures become CommunicationError
                comm = self._graph_comm_error(e, rec or record(), time.perf_counter() - t0)
                if comm is None:
                    raise
                raise comm from e
            finally:
                _tls.depth -= 1
                if rec is not None:
                    rec.runs += 1
                    obs = _tls.observer
                    if obs is not None:
                        obs.ran(rec)

        if getattr(fn, "_boxed_call", False):
            run._boxed_call = True  # type: ignore[attr-defined]
        return run

    def _graph_comm_error(
        self, e: BaseException, rec: GraphRecord, elapsed_s: float
    ) -> CommunicationError | None:
        node = _failing_node(e)
        is_comm = isinstance(e, dist.DistError) or (node is not None and _is_comm_node(node))
        if not is_comm:
            return None
        what = f"a collective in graph {rec.id} of {self.model_name} (call {self.calls})"
        where = ""
        if node is not None:
            start = _collective_of(node)
            where = f"collective: {_describe_node(start)}"
        tag = f"{self.ordinal}/{self.seq}/graph"
        timeout_s = self.config.timeout_s
        return rankcheck.communication_error(e, what, tag, self.ranks, elapsed_s, timeout_s, where)

    # --- call side -----------------------------------------------------------------------
    def call(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        with self.lock:
            dead = rankcheck.dead_reason(self.ranks)
            if dead is not None:
                raise CommunicationError(
                    f"cpfx: rank {self.info.cp_rank}: {self.model_name} cannot run: the process "
                    f"group failed earlier ({dead}). Collectives on a failed group do not recover: "
                    "destroy and re-create the process group (dist.destroy_process_group(); "
                    "dist.init_process_group(...)), then cpfx.parallelize the model again."
                )
            leaves, spec = tree_flatten((args, kwargs))
            grad_problem = self._grad_problem(leaves)
            sig = _signature(spec, leaves)
            first = sig not in self.seen
            self.calls += 1
            self.seq += 1
            misplaced = misplaced_inputs(leaves, _device_type_of(self.model_ref))
            if self.info.check_group is not None and self.config.check_inputs != "never":
                digest = first or self.config.check_inputs == "always"
                self._cross_check(
                    args, kwargs, leaves, sig, (digest, first), grad_problem, misplaced
                )
            elif misplaced:
                raise self._input_error(misplaced, None, leaves, args, kwargs)
            elif grad_problem:
                raise CpfxError(grad_problem)
            rankcheck.set_graph_timeout(self.graph_groups, self.config.timeout_s)
            n_graphs = len(self.graphs)
            self.pending_reasons.clear()  # a compile that failed in tracing left its reasons
            mark = self.config.dynamic and self._count(sig) <= dynamic.MARK_CALLS
            if mark and not self.config.regional:
                dynamic.mark_sizes((args, kwargs))
            resident.state.in_model += 1
            outer_mark, resident.state.mark_sizes = resident.state.mark_sizes, mark
            try:
                out, report = self._run(fn, args, kwargs, sig if first else None)
                if self.config.regional:  # no token shard leaves the model
                    out = resident.materialize(out)
            except BaseException:
                self.failed_calls += 1
                self.forget_failed(n_graphs)
                raise
            finally:
                resident.state.in_model -= 1
                resident.state.mark_sizes = outer_mark
            if report is not None:
                self._judge(report)
            if first:
                self.seen.add(sig)
            elif len(self.graphs) > n_graphs:
                self.seen.discard(sig)  # a recompile: observe the next call of this signature
            return out

    def forget_failed(self, n_graphs: int) -> None:
        """After a failed call: the graphs it compiled that never ran through (their first run
        raised, e.g. float64 inputs to a float32 model) are marked failed. Dynamo keeps their
        cache entries (a repeat of that call gets the same error without compiling), so each
        region's recompile limit is raised by one per such entry: failed calls take no slot of
        `max_recompiles`, and their guard failures are no recompile reason."""
        new = [g for g in self.graphs[n_graphs:] if g.runs == 0 and not g.failed]
        for g in new:
            g.failed = True
            if g.reason and g.reason in self.recompile_reasons:
                self.recompile_reasons.remove(g.reason)
            g.reason = None
        entries = sum(1 for g in new if g.compile_id)
        if entries:
            self.failed_variants += entries
            for set_limit in self.limit_setters:
                set_limit(self.recompile_limit)
            log.info("cpfx: %s: %d graph(s) of a failed call take no recompile slot",
                     self.model_name, entries)

    def _count(self, sig: Any) -> int:
        n = self.sig_calls.get(sig, 0) + 1
        if n <= dynamic.MARK_CALLS + 1:
            self.sig_calls[sig] = n
        return n

    def _run(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], sig: Any
    ) -> tuple[Any, AttentionReport | None]:
        from torch._dynamo.exc import BackendCompilerFailed

        from cpfx.p2p import finish_sends

        report = AttentionReport(_sig_text(sig), self.calls) if sig is not None else None
        try:
            with _recompile_limit_is_an_error(
                self.recompile_limit if self.patch_limit else None
            ):
                if report is None:
                    out = fn(*args, **kwargs)
                else:
                    obs = _AttentionObserver(self._module_paths(), report)
                    _tls.observer = obs
                    try:
                        with obs:
                            out = fn(*args, **kwargs)
                    finally:
                        _tls.observer = None
            finish_sends()  # no send of the last ring step is left un-waited after the call
            return out, report
        except BackendCompilerFailed as e:
            _drop_sends()
            inner = getattr(e, "inner_exception", None)
            if isinstance(inner, CommunicationError):
                rankcheck.mark_dead(self.ranks, str(inner))
            if isinstance(inner, CpfxError):
                raise inner.with_traceback(None) from None
            raise
        except CommunicationError as e:
            _drop_sends()
            rankcheck.mark_dead(self.ranks, str(e))
            raise
        except Exception as e:  # noqa: BLE001 - context is added, the exception is not replaced
            _drop_sends()
            if _is_recompile_limit(e):
                raise self._recompile_error() from e
            if isinstance(e, dist.DistError):
                comm = rankcheck.communication_error(
                    e,
                    f"a collective of {self.model_name}",
                    f"{self.ordinal}/{self.seq}/call",
                    self.ranks,
                    0.0,
                    None,
                )
                rankcheck.mark_dead(self.ranks, str(comm))
                raise comm from e
            _add_note(
                e,
                f"cpfx: raised on rank {self.info.cp_rank} during call {self.calls} of "
                f"parallelized {self.model_name}",
            )
            raise

    def _module_paths(self) -> dict[int, str]:
        if self._paths is None:
            self._paths = {id(m): name for name, m in self.model_ref.named_modules()}
        return self._paths

    def _judge(self, report: AttentionReport) -> None:
        self.reports.append(report)
        if self.info.world > 1 and report.parallel == 0 and report.short and not (
            report.whole or report.outside
        ):
            log.info("cpfx: %s: every attention is over a sequence too short to split; it runs "
                     "whole on every rank", self.model_name)
            return
        if self.info.world > 1 and report.parallel == 0:
            if report.whole:
                outside = (
                    f"; {report.outside_total} more ran outside cpfx's compiled graphs "
                    f"({_where_text(report.outside)}: graph breaks, torch.compiler.disable, "
                    "custom processors)"
                    if report.outside
                    else ""
                )
                raise UnsupportedPatternError(
                    f"cpfx: none of the attention calls of {self.model_name} could be "
                    "parallelized; every rank would compute the whole model: "
                    + "; ".join(report.whole)
                    + outside
                    + ". `cpfx.explain(model, ..., verbose=True)` shows the plan."
                )
            where = _where_text(report.outside)
            outside = (
                f" {report.outside_total} ran outside cpfx's compiled graphs ({where}), where "
                "cpfx cannot parallelize them (torch.compiler.disable regions, graph breaks, "
                "gradient checkpointing, custom attention processors)."
                if report.outside
                else " cpfx needs attention computed with "
                "torch.nn.functional.scaled_dot_product_attention (diffusers' default)."
            )
            raise ConfigError(
                f"cpfx: found no scaled_dot_product_attention over a sequence inside the compiled "
                f"graphs of {self.model_name}; there is nothing to parallelize.{outside}"
            )
        if report.whole:
            warnings.warn(
                f"cpfx: {sum(report.whole.values())} attention call(s) of {self.model_name} ran on "
                "the whole sequence on every rank (not parallelized, exact): "
                + "; ".join(f"{w} (x{c})" for w, c in report.whole.items())
                + f"; {report.parallel} ran context-parallel. `cpfx.explain(..., verbose=True)` "
                "shows the plan.",
                CpfxWarning,
                stacklevel=4,
            )
        if not report.outside:
            return
        msg = (
            f"cpfx: {report.outside_total} attention call(s) of {self.model_name} ran outside "
            f"cpfx's compiled graphs and were NOT parallelized (every rank computed them in full): "
            f"{_where_text(report.outside)}; {report.parallel} ran context-parallel. Causes: "
            "torch.compiler.disable regions, graph breaks into eager code, gradient "
            "checkpointing, custom attention processors. "
        )
        if self.config.strict:
            raise UnsupportedPatternError(msg + "Raised because ParallelConfig(strict=True).")
        warnings.warn(
            msg + "ParallelConfig(strict=True) makes this an error.", CpfxWarning, stacklevel=4
        )

    def _grad_problem(self, leaves: list[Any]) -> str | None:
        """Why this call must be refused for grad mode (None: fine): gradients are exact for the
        configurations `cpfx.training` covers. Costs one flag read when gradients are disabled, as
        in diffusers pipelines."""
        if not torch.is_grad_enabled():
            return None
        from cpfx.training import refuse_unsupported

        try:
            refuse_unsupported(self.config, self.info)
            return None  # the usual case in training: no scan of the parameters on each step
        except CpfxError as e:
            problem = f"{e} (rank {self.info.cp_rank}, {self.model_name})"
        if any(isinstance(x, torch.Tensor) and x.requires_grad for x in leaves) or any(
            p.requires_grad for p in self.model_ref.parameters()
        ):
            return problem
        return None

    @property
    def recompile_limit(self) -> int:
        """Dynamo's limit for each of this model's compiled regions: `max_recompiles` graphs, or
        for a regional block class `max_recompiles` input signatures of `REGIONAL_VARIANTS`
        graphs each (whole inputs, and each layout of the token shards it is handed); plus the
        graphs of failed calls (`forget_failed`; counted over the model, not per region)."""
        per = REGIONAL_VARIANTS if self.config.regional else 1
        return self.config.max_recompiles * per + self.failed_variants

    def _recompile_error(self) -> RecompileLimitError:
        reason = self._take_reason() or "(Dynamo gave no reason)"
        hint = _recompile_hint(reason)
        per_class = (
            f"; x{REGIONAL_VARIANTS} graphs per block class with regional=True"
            if self.config.regional
            else ""
        )
        return RecompileLimitError(
            f"cpfx: {self.model_name} needs more than max_recompiles={self.config.max_recompiles} "
            f"compiled variants (Dynamo's recompile limit for this model{per_class}); Dynamo would "
            f"now run it "
            f"eagerly, without context parallelism, on every rank. What changed since the last "
            f"compiled variant: {reason}. {hint} If the variants are intended, raise "
            f"ParallelConfig(max_recompiles=...)."
        )

    # --- cross-rank input check --------------------------------------------------------
    def _cross_check(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        leaves: list[Any],
        sig: Any,
        digest_first: tuple[bool, bool],
        grad_problem: str | None,
        misplaced: list[int],
    ) -> None:
        info = self.info
        digest, first = digest_first
        sig_hash = self._sig_hashes.get(sig)
        if sig_hash is None:
            if len(self._sig_hashes) > 256:
                self._sig_hashes.clear()
            sig_hash = self._sig_hashes[sig] = rankcheck.text_hash(repr(sig[1:]))
        flags = int(digest) | (int(first) << 1)
        grad = int(grad_problem is not None)
        fields = [
            _MAGIC,
            self.ordinal,
            self.seq,
            sig_hash,
            flags,
            len(leaves),
            self._name_hash,
            grad,
            sum(1 << min(i, 61) for i in misplaced),
            self.calls,
        ]
        tensors = [
            x
            if isinstance(x, torch.Tensor)
            and (digest or x.numel() <= SMALL)
            and i not in misplaced  # a meta tensor has no bytes to hash
            else None
            for i, x in enumerate(leaves)
        ]
        digests = rankcheck.digest_rows(tensors, SLOTS, SMALL).reshape(-1)
        head = torch.cat([torch.tensor(fields, dtype=torch.int64), digests])
        what = f"the input check of call {self.calls} of {self.model_name}"
        tag = f"{self.ordinal}/{self.seq}/inputs"
        t0 = time.perf_counter()
        try:
            rows = rankcheck.all_gather(
                head, info.check_group, info.world, self.config.timeout_s, what, tag
            )
        except CommunicationError as e:
            rankcheck.mark_dead(self.ranks, str(e))
            raise
        log.debug("cpfx input check: %.2f ms", (time.perf_counter() - t0) * 1e3)
        if bool(rows[:, _DEVICES].any()):
            raise self._input_error(misplaced, rows[:, _DEVICES], leaves, args, kwargs)
        if grad_problem:
            raise CpfxError(grad_problem)
        if bool(rows[:, 7].any()):
            others = [r for r in range(info.world) if rows[r, 7]]
            raise CpfxError(
                f"cpfx: rank(s) {others} called {self.model_name} with gradients enabled and "
                "parameters or inputs requiring grad, under a configuration cpfx refuses in grad "
                "mode (gradients would not be exact: fp8_comm); every rank raises. Call it under "
                "torch.no_grad() / torch.inference_mode(), or turn that option off."
            )
        if bool((rows[:, :_CALLS] == rows[0, :_CALLS]).all()) and bool(
            (rows[:, _FIELDS:] == rows[0, _FIELDS:]).all()
        ):
            return  # the common case: every rank sent the same header (but for its call count)
        msg = self._compare_headers(rows, leaves, args, kwargs)
        if msg:
            self.seq = int(rows[:, 2].max())  # realign the call numbers for later calls
            raise RankDivergenceError(msg)

    def _compare_headers(
        self, rows: torch.Tensor, leaves: list[Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> str | None:
        world = rows.shape[0]
        me = self.info.cp_rank
        ref = rows[0]
        bad = lambda col: [r for r in range(world) if rows[r, col] != ref[col]]  # noqa: E731
        if bad(1) or bad(6) or bad(0):
            per = ", ".join(f"rank {r}: model #{int(rows[r, 1])}" for r in range(world))
            return (
                f"cpfx: the ranks are calling different parallelized models ({per}; this rank "
                f"{me} calls #{self.ordinal}, {self.model_name}). Every rank must call the same "
                "models in the same order."
            )
        if bad(2):
            per = ", ".join(
                f"rank {r}: its call {int(rows[r, _CALLS])}, cpfx's check {int(rows[r, 2])}"
                for r in range(world)
            )
            return (
                f"cpfx: ranks {bad(2)} are at a different call of {self.model_name} than rank 0 "
                f"({per}): a rank skipped or repeated a call. Every rank must make the same calls "
                "in the same order (each call's collectives pair up across ranks)."
            )
        if bad(3) or bad(5):
            return self._shape_mismatch(rows, leaves, args, kwargs)
        if bad(4):
            per = ", ".join(
                f"rank {r}: {'first' if int(rows[r, 4]) & 2 else 'repeat'}" for r in range(world)
            )
            return (
                f"cpfx: ranks disagree whether call {self.calls} of {self.model_name} is the first "
                f"of its input signature ({per}): their earlier calls or compiled variants "
                "differ (e.g. a module attribute or adapter set changed on some ranks only)."
            )
        # Small inputs are hashed on every call, all of them when bit 0 is set.
        digests = rows[:, _FIELDS:].reshape(world, SLOTS, 2)
        differs = (digests != digests[0]).any(dim=2)  # [world, SLOTS]
        if bool(differs.any()):
            return self._bytes_mismatch(rows, differs, leaves, args, kwargs)
        return None

    def _bytes_mismatch(
        self,
        rows: torch.Tensor,
        differs: torch.Tensor,
        leaves: list[Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> str:
        """Same shapes, other bytes. A rank that skipped or repeated a call looks just like this
        when it is made (each rank counts its own calls: they are at the same count), so the
        message gives each rank's own call count and, after a second exchange, the values of the
        small inputs that differ (a timestep tells which step of the caller's loop a rank is at)."""
        world = rows.shape[0]
        everyone = rankcheck.all_gather(
            _small_values(leaves).reshape(-1),
            self.info.check_group,
            world,
            self.config.timeout_s,
            f"the input check of call {self.calls}",
            f"{self.ordinal}/{self.seq}/values",
        ).reshape(world, SLOTS, 1 + VALUES)
        names = _leaf_names(args, kwargs)
        shown, hashed = [], []
        for s in (s for s in range(min(SLOTS, len(names))) if bool(differs[:, s].any())):
            col = everyone[:, s]
            if bool((col[:, 0] >= 0).all()):
                per = "; ".join(f"rank {r}: {_values_text(col[r])}" for r in range(world))
                shown.append(f"{names[s]}: {per}")
            else:
                hashed.append(names[s] + (" (or a later input)" if s == SLOTS - 1 else ""))
        if hashed:
            shown.append(f"the bytes of {', '.join(hashed)} differ")
        ranks = [r for r in range(world) if bool(differs[r].any())]
        calls = "; ".join(f"rank {r}: its call {int(rows[r, _CALLS])}" for r in range(world))
        return (
            f"cpfx: ranks {ranks} received different inputs than rank 0 at the same call of "
            f"{self.model_name} ({calls}): " + "; ".join(shown) + " (same shapes). Either a rank "
            "skipped or repeated a call (then the ranks are at different steps of the caller's "
            "loop: compare the values), or the ranks were given different inputs (same seed, "
            "same prompt; a generator seeded with the rank is the usual cause). Every rank must "
            "make the same calls, with the same full inputs, in the same order."
        )

    def _input_error(
        self,
        misplaced: list[int],
        column: torch.Tensor | None,
        leaves: list[Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> InputError:
        """Names this rank's misplaced inputs (`misplaced_inputs`) and, from the header's
        `_DEVICES` column when there is one, those of the other ranks."""
        me = self.info.cp_rank
        names = _leaf_names(args, kwargs)
        name = lambda i: names[i] if i < len(names) else f"input #{i}"  # noqa: E731
        ref = _device_type_of(self.model_ref) or _first_device_type(leaves)
        parts = [_placement_text(name(i), leaves[i], ref) for i in misplaced]
        bits = [int(b) for b in column] if column is not None else []
        others = {
            r: [name(i) for i in range(62) if b >> i & 1] for r, b in enumerate(bits) if r != me and b
        }
        if others:
            per = "; ".join(f"rank {r}: {', '.join(n)}" for r, n in others.items())
            parts.append(
                f"rank(s) {sorted(others)} called it with inputs they cannot run, {per} (on the "
                "meta device, or on another device type than the model; their errors say which)"
            )
        told = (
            "Every rank raises this before any collective."
            if column is not None
            else "(cpfx's input check is off: the other ranks are not told.)"
        )
        return InputError(
            f"cpfx: rank {me}: call {self.calls} of {self.model_name} cannot run: "
            + "; ".join(parts)
            + f". Pass every input on the model's device ({ref}) on every rank (a 0-d CPU tensor "
            f"may stay on the CPU). {told}"
        )

    def _shape_mismatch(
        self, rows: torch.Tensor, leaves: list[Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> str:
        """Second exchange, only after a mismatch: every rank's input shapes, to name them."""
        info = self.info
        width = 3 + _MAX_DIMS
        table = torch.full((SLOTS, width), -1, dtype=torch.int64)
        for i, x in enumerate(leaves[:SLOTS]):
            if isinstance(x, torch.Tensor):
                table[i, 0], table[i, 1], table[i, 2] = (
                    1,
                    rankcheck.text_hash(str(x.dtype)),
                    x.dim(),
                )
                for d, s in enumerate(tuple(x.shape)[:_MAX_DIMS]):
                    table[i, 3 + d] = int(s)
            else:
                table[i, 0], table[i, 1] = 2, rankcheck.text_hash(_value_text(x))
        everyone = rankcheck.all_gather(
            table.reshape(-1),
            info.check_group,
            info.world,
            self.config.timeout_s,
            f"the input check of call {self.calls}",
            f"{self.ordinal}/{self.seq}/shapes",
        ).reshape(info.world, SLOTS, width)
        names = _leaf_names(args, kwargs)
        counts = [int(rows[r, 5]) for r in range(info.world)]
        lines = []
        for s in range(SLOTS):
            col = everyone[:, s]
            if bool((col == col[0]).all()):
                continue
            name = names[s] if s < len(names) else f"input #{s}"
            per = "; ".join(f"rank {r}: {_slot_text(col[r])}" for r in range(info.world))
            lines.append(f"{name}: {per}")
        if not lines:
            lines.append(
                "number of inputs: " + ", ".join(f"rank {r}: {c}" for r, c in enumerate(counts))
            )
        diff_ranks = sorted(
            {
                r
                for r in range(info.world)
                for s in range(SLOTS)
                if bool((everyone[r, s] != everyone[0, s]).any())
            }
            or {r for r in range(info.world) if counts[r] != counts[0]}
        )
        return (
            f"cpfx: ranks {diff_ranks} received different inputs than rank 0 in call {self.calls} "
            f"of {self.model_name} (shapes/dtypes/values differ): " + " | ".join(lines) + ". "
            "Every rank must call the model with the same full inputs; running on would mix "
            "different sequences in the collectives."
        )


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _model_code(code: types.CodeType, model: torch.nn.Module) -> types.CodeType:
    """The model's own function behind `code`, the frame Dynamo compiled: where that frame is a
    decorator's wrapper around a module's forward (diffusers' `apply_lora_scale`, in
    peft_utils.py, wraps Flux's), the forward it wraps; `code` itself otherwise."""
    if not graph_utils.is_plumbing(code.co_filename):
        return code
    seen: set[type] = set()
    for m in model.modules():
        if type(m) in seen:
            continue
        seen.add(type(m))
        chain = [type(m).forward]
        while hasattr(chain[-1], "__wrapped__"):
            chain.append(chain[-1].__wrapped__)
        if any(getattr(f, "__code__", None) is code for f in chain[:-1]):
            return getattr(chain[-1], "__code__", code)
    return code


def _is_sdpa(n: fx.Node) -> bool:
    return n.op == "call_function" and "scaled_dot_product_attention" in str(
        getattr(n.target, "__name__", n.target)
    )


def _signature(spec: Any, leaves: list[Any]) -> tuple[Any, ...]:
    """Hashable description of a call's inputs: structure, tensor shapes/dtypes, plain values.
    The device type (not its index: ranks use different GPUs) is part of it."""
    items: list[Any] = []
    for x in leaves:
        if isinstance(x, torch.Tensor):
            items.append((tuple(x.shape), str(x.dtype), x.device.type))
        else:
            items.append(_value_text(x))
    return (spec, tuple(items))  # a TreeSpec hashes and compares by structure and keys


def misplaced_inputs(leaves: list[Any], expected: str | None) -> list[int]:
    """Indices of the tensor inputs cpfx cannot run: on the meta device, or on another device type
    than `expected` (the model's; None: that of the first tensor input that is not a 0-d CPU
    tensor). A 0-d CPU tensor goes with any device, as in torch. Device indexes are not compared
    (ranks use different GPUs).

    A meta input is an `InputError` naming it, not the error the single process would give: that
    one comes from wherever in the model the meta tensor first meets a real one ("Tensor on device
    cpu is not on the expected device meta!"; none at all for a model on the meta device), and
    under Dynamo it becomes a tracing error with other words, so matching it would mean running
    the model unparallelized first. cpfx cannot run a meta input in any case: it has no bytes to
    hash for the input check nor to send in a collective. The header carries each rank's
    misplaced inputs, so every rank raises, before any collective (the others would otherwise
    wait in the input check for `timeout_s`)."""
    out = []
    for i, x in enumerate(leaves):
        if not isinstance(x, torch.Tensor):
            continue
        kind = x.device.type
        if kind == "meta":
            out.append(i)
        elif kind == "cpu" and x.dim() == 0:
            continue
        elif expected is None:
            expected = kind
        elif kind != expected:
            out.append(i)
    return out


def _device_type_of(model: torch.nn.Module) -> str | None:
    """The device type of the model's first parameter (or buffer); None if it has neither."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device.type
    return None


def _first_device_type(leaves: list[Any]) -> str | None:
    return next(
        (
            x.device.type
            for x in leaves
            if isinstance(x, torch.Tensor) and x.device.type != "meta"
            and not (x.device.type == "cpu" and x.dim() == 0)
        ),
        None,
    )


def _placement_text(name: str, x: torch.Tensor, ref: str | None) -> str:
    if x.device.type == "meta":
        return (
            f"{name} is on the meta device (a meta tensor holds no data: cpfx hashes every "
            "input's bytes to compare the ranks' inputs, and its collectives send them)"
        )
    return f"{name} is on {x.device} (the model's inputs go on {ref})"


def _small_values(leaves: list[Any]) -> torch.Tensor:
    """`[SLOTS, 1 + VALUES]` int64: per input slot, the element count and the float64 bits of
    the values of a real tensor of at most `VALUES` elements; -1 in the count otherwise (and in
    the last slot where it is shared by several inputs)."""
    table = torch.full((SLOTS, 1 + VALUES), -1, dtype=torch.int64)
    for i, x in enumerate(leaves[:SLOTS]):
        shared = i == SLOTS - 1 and len(leaves) > SLOTS
        if isinstance(x, torch.Tensor) and x.numel() <= VALUES and not shared:
            if x.is_complex() or x.device.type == "meta":
                continue
            v = x.detach().reshape(-1).to("cpu", torch.float64)
            table[i, 0] = v.numel()
            table[i, 1 : 1 + v.numel()] = v.view(torch.int64)
    return table


def _values_text(row: torch.Tensor) -> str:
    n = int(row[0])
    values = row[1 : 1 + n].clone().view(torch.float64).tolist()
    return "[" + ", ".join(f"{v:.6g}" for v in values) + "]"


def _value_text(x: Any) -> str:
    if x is None or isinstance(x, (bool, int, float, str)):
        return f"{type(x).__name__}:{x!r}"
    return type(x).__name__


def _sig_text(sig: Any) -> str:
    if sig is None:
        return ""
    parts = []
    for it in sig[1]:
        parts.append(
            f"{list(it[0])}:{it[1].replace('torch.', '')}" if isinstance(it, tuple) else it
        )
    return ", ".join(parts)


def _slot_text(row: torch.Tensor) -> str:
    kind = int(row[0])
    if kind == 1:
        nd = int(row[2])
        return f"shape {[int(s) for s in row[3 : 3 + min(nd, _MAX_DIMS)]]}"
    if kind == 2:
        return f"value #{int(row[1]) & 0xFFFF:04x}"
    return "absent"


def _leaf_names(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str]:
    from torch.utils._pytree import keystr

    flat, _ = tree_flatten_with_path((args, kwargs))
    out = []
    for path, _ in flat:
        s = keystr(path)
        m = re.match(r"\[1\]\['([^']+)'\](.*)", s)
        if m:
            out.append(m.group(1) + m.group(2))
        else:
            m = re.match(r"\[0\]\[(\d+)\](.*)", s)
            out.append(f"args[{m.group(1)}]{m.group(2)}" if m else s)
    return out


def _where_text(outside: dict[str, int]) -> str:
    return ", ".join(f"{k} (x{v})" for k, v in sorted(outside.items(), key=lambda kv: -kv[1]))


def _add_note(e: BaseException, note: str) -> None:
    if hasattr(e, "add_note") and note not in getattr(e, "__notes__", ()):
        e.add_note(note)


def _drop_sends() -> None:
    """After a failed call: wait what can be waited, never mask the original error."""
    from cpfx.p2p import _pending_sends

    works = _pending_sends.works
    while works:
        try:
            works.pop().wait()
        except Exception as e:  # noqa: BLE001 - the call's own error is the one to report
            log.debug("cpfx: a pending send failed after a failed call: %s", e)


def _is_recompile_limit(e: BaseException) -> bool:
    try:
        from torch._dynamo.exc import FailOnRecompileLimitHit
    except ImportError:  # older torch: FailOnCacheLimitHit
        from torch._dynamo.exc import FailOnCacheLimitHit as FailOnRecompileLimitHit  # type: ignore
    return isinstance(e, FailOnRecompileLimitHit)


@functools.cache
def _limit_patch(limit: int | None) -> tuple[tuple[str, Any], ...]:
    cfg = torch._dynamo.config
    fail = "fail_on_recompile_limit_hit"
    patch: dict[str, Any] = {fail if hasattr(cfg, fail) else "fail_on_cache_limit_hit": True}
    if limit is not None:
        name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
        patch[name] = limit
    if hasattr(cfg, "skip_nnmodule_hook_guards"):
        # Dynamo skips guards on module hooks by default: a hook added after the first call, or
        # on one regional block and not its siblings (which share a graph), would be ignored.
        patch["skip_nnmodule_hook_guards"] = False
    return tuple(patch.items())


class _recompile_limit_is_an_error:
    """Within a call: Dynamo raises at its recompile limit instead of running eagerly (and, on a
    torch without per-compile limits, uses `limit` as the global one), and guards module hooks.
    Settings that already have the value are left alone (this runs on every call)."""

    def __init__(self, limit: int | None) -> None:
        self.patch = _limit_patch(limit)

    def __enter__(self) -> None:
        cfg = torch._dynamo.config
        self.old: list[tuple[str, Any]] = []
        for k, v in self.patch:
            old = getattr(cfg, k)
            if old != v:
                self.old.append((k, old))
                setattr(cfg, k, v)

    def __exit__(self, *exc: object) -> None:
        for k, v in self.old:
            setattr(torch._dynamo.config, k, v)


def _short_reason(reason: str) -> str:
    """Dynamo's guard failure without its user stack (the first line names the guard and the
    source line that installed it)."""
    first = reason.strip().splitlines()[0] if reason.strip() else reason
    return re.sub(r"^\d+/\d+: ", "", first)


def _recompile_hint(reason: str) -> str:
    if "size mismatch" in reason or "stride mismatch" in reason or "dimensionality" in reason:
        return (
            "Input shapes changed: each shape is its own compiled variant (shards are planned "
            "statically); use a few fixed resolutions/lengths."
        )
    if "requires_grad" in reason:
        return "A parameter's requires_grad changed (e.g. set_adapters); keep it fixed."
    if "active_adapter" in reason or "_active_adapter" in reason or "len(" in reason:
        return (
            "The set of active adapters (or another container) changed: each set is its own "
            "variant; load all adapters once and switch among a few sets."
        )
    if "==" in reason:
        return (
            "A Python value the model reads changed (an int/str attribute or argument, or a float "
            "used where cpfx cannot make it a graph input); keep it fixed or pass it as a tensor."
        )
    return ""


def _failing_node(e: BaseException) -> fx.Node | None:
    """The FX node whose generated line raised `e` (innermost cpfx/FX graph frame), if any."""
    tb = e.__traceback__
    found = None
    while tb is not None:
        f = tb.tb_frame
        gm = f.f_locals.get("self")
        if isinstance(gm, fx.GraphModule) and f.f_code.co_filename.startswith("<eval_with_key"):
            line = linecache.getline(f.f_code.co_filename, tb.tb_lineno)
            m = re.match(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*=", line)
            if m:
                found = next((n for n in gm.graph.nodes if n.name == m.group(1)), found)
        tb = tb.tb_next
    return found


def _is_comm_node(n: fx.Node) -> bool:
    name = str(op_of(n))
    return "_c10d_functional" in name or "ring_send_recv" in name or "c10d" in name


def _collective_of(n: fx.Node) -> fx.Node:
    """The collective a wait node waits for (the node itself otherwise)."""
    if "wait_tensor" in str(op_of(n)) and n.args and isinstance(n.args[0], fx.Node):
        return n.args[0]
    return n


def _describe_node(n: fx.Node) -> str:
    """`all_to_all_single(q), group '0' (ranks [0, 1]), in transformer_blocks.0.attn,
    transformer_flux.py:123: out = ...`"""
    kind = str(op_of(n)).replace("_c10d_functional.", "").replace(".default", "")
    group = next((a for a in n.args if isinstance(a, str)), "")
    role = n.meta.get("cpfx_role", "")
    parts = [f"{kind}({role})" if role else kind]
    if group:
        parts.append(f"group {group!r}{_group_ranks(group)}")
    if "ring_send_recv" in kind and len(n.args) >= 3:
        parts.append(f"send to rank {n.args[1]}, receive from rank {n.args[2]}")
    module = module_path_of(n)
    if module:
        parts.append(f"in {module}")
    src = source_line_of(n)
    if src:
        parts.append(src)
    return ", ".join(parts)


def _group_ranks(name: str) -> str:
    try:
        from torch.distributed.distributed_c10d import _resolve_process_group

        group = _resolve_process_group(name)  # type: ignore[arg-type]  # NewType of str
        return f" (ranks {dist.get_process_group_ranks(group)})"
    except Exception:  # noqa: BLE001 - the name alone still helps
        return ""


def module_path_of(n: fx.Node) -> str:
    """The model submodule a node came from (`transformer_blocks.0.attn`)."""
    return graph_utils.module_path(n)


def source_line_of(n: fx.Node) -> str:
    """`file.py:123: `code`` of the model's source line a node came from."""
    return graph_utils.source_line(n)


def compile_call(call_impl: Callable[..., Any], runtime: Runtime) -> Callable[..., Any]:
    """Dynamo-compile `call_impl` for `runtime`'s model: every shape and int static, floats as graph
    inputs where this torch allows it (`shapes_spec`), one recompile region per model with the
    config's limit, and Dynamo's guard failures reported to the runtime."""
    from torch._dynamo import eval_frame

    try:
        params = set(inspect.signature(eval_frame._optimize).parameters)
    except (AttributeError, ValueError):
        params = set()
    kw: dict[str, Any] = {}
    if runtime.config.dynamic:
        pass  # Dynamo's default: static, except the dims cpfx marks (`cpfx.dynamic.mark_sizes`)
    elif "shapes_spec" in params:
        from torch.fx.experimental.dynamic_spec import ShapesSpec

        kw["shapes_spec"] = ShapesSpec()  # nothing declared dynamic: every shape and int static
    else:
        kw["dynamic"] = False
    if "isolate_recompiles" in params:
        kw["isolate_recompiles"] = True
    if "guard_fail_fn" in params:
        kw["guard_fail_fn"] = runtime.guard_fail
    if "recompile_limit" in params:
        ctx = torch._dynamo.optimize(
            runtime.backend, recompile_limit=runtime.recompile_limit, **kw
        )
        setter = _limit_setter(ctx)
        if setter is not None:
            runtime.limit_setters.append(setter)
            return ctx(call_impl)
    runtime.patch_limit = True  # the limit is set around each call instead
    return torch._dynamo.optimize(runtime.backend, **kw)(call_impl)


def _limit_setter(ctx: Any) -> Callable[[int], None] | None:
    """Sets the per-region recompile limit a Dynamo context was made with (kept by its
    `ConvertFrameAssert`; raised after a failed call, `Runtime.forget_failed`); None where this
    torch keeps it elsewhere."""
    convert = getattr(getattr(ctx, "callback", None), "_torchdynamo_orig_backend", None)
    inner = getattr(convert, "_inner_convert", None)
    if not isinstance(getattr(inner, "_recompile_limit", None), int):
        return None
    return lambda limit: setattr(inner, "_recompile_limit", limit)
