"""The Dynamo backend: captured FX graph in, rewritten per-rank graph out.

`torch.compile(model, backend="cpfx")` (registered through the `torch_dynamo_backends` entry
point) uses a 1-D Ulysses mesh over the whole default process group and the default config;
`cpfx.backend(mesh, config)` gives a configured one.

Each Dynamo graph is functionalized by AOTAutograd (`cpfx.capture`); the functional ATen graph
goes through the pass pipeline (`cpfx.pipeline`) and runs as an FX GraphModule, or through
inductor with `ParallelConfig(compile=True)`.
"""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

from cpfx import capture, dynamic, resident
from cpfx.config import ParallelConfig
from cpfx.context import PassContext
from cpfx.debug import env_dump_dir
from cpfx.errors import CpfxError
from cpfx.mesh import MeshInfo, mesh_info
from cpfx.pipeline import active_passes, build_pipeline, run_passes

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

log = logging.getLogger(__name__)


class CpfxBackend:
    """A Dynamo backend that parallelizes every graph it receives. `graphs` keeps the rewritten
    graphs (for inspection), `mesh_info` this rank's place on the mesh."""

    def __init__(
        self, mesh: DeviceMesh | None = None, config: ParallelConfig | None = None
    ) -> None:
        config = config or ParallelConfig()
        import dataclasses
        import os

        if config.dump_dir is None and env_dump_dir():
            config = dataclasses.replace(config, dump_dir=env_dump_dir())
        if not config.verify and os.environ.get("CPFX_VERIFY", "") not in ("", "0"):
            config = dataclasses.replace(config, verify=True)
        self.config = config
        self.mesh_info: MeshInfo = mesh_info(mesh, config)
        self.graphs: list[fx.GraphModule] = []
        self._ids = itertools.count()
        self.last_variants: dynamic.ShapeVariants | dynamic.PerSizeTrace | None = None
        """The size variants of the graph compiled last (None when it was captured static)."""

    def __call__(self, gm: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        graph_id = next(self._ids)
        self.last_variants = None
        if self.mesh_info.world == 1:
            return gm.forward
        names = [_input_name(n) for n in gm.graph.nodes if n.op == "placeholder"]
        if _records_autograd(example_inputs):
            if dynamic.is_symbolic(
                [n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"]
            ):
                return self._per_size(gm, example_inputs, names, training=True)
            return self._compile_training(gm, example_inputs, graph_id, names)
        whole = self.config.regional and resident.whole_block(gm)
        if self.config.regional and dynamic.is_symbolic(example_inputs):
            # A block graph is small: functionalizing it again per set of sizes (static) costs
            # less than functionalizing it once symbolically, and much less at the first call.
            return self._per_size(gm, example_inputs, names, training=False, whole=whole)
        try:
            return self._functionalized(gm, example_inputs, graph_id, names, whole)
        except dynamic.NotSpecializable as e:
            log.info("cpfx: graph %d: %s; it is re-traced for each new set of sizes", graph_id, e)
            return self._per_size(gm, example_inputs, names, training=False, whole=whole)

    def _functionalized(
        self,
        gm: fx.GraphModule,
        example_inputs: list[Any],
        graph_id: int,
        names: list[str],
        whole: bool = False,
    ) -> Callable[..., Any]:
        """AOTAutograd's inference function for `gm`, around a `GraphRunner` (static sizes) or a
        `dynamic.ShapeVariants` (symbolic sizes: its first variant, at the traced sizes, is
        compiled now, so `self.graphs` holds it on return). `whole`: `gm` is a whole regional
        block call (`resident.whole_block`), whose token-sharded outputs may stay resident from
        its first run."""
        runners: list[GraphRunner] = []
        tracing = True

        def compile_variant(aten_gm: fx.GraphModule, inputs: tuple[Any, ...]) -> GraphRunner:
            gid = graph_id if not runners else next(self._ids)
            runner = self.compile_aten(aten_gm, list(inputs), gid, names)
            runner.resident_ok = whole
            if tracing:
                runners.append(runner)
            else:  # a later variant, compiled at run time
                runner.finish()
            return runner

        def compile_fn(aten_gm: fx.GraphModule, inputs: list[Any]) -> Any:
            if not dynamic.is_symbolic(inputs):
                return compile_variant(aten_gm, tuple(inputs))
            variants = dynamic.ShapeVariants(aten_gm, inputs, compile_variant)
            variants.limit = self.config.max_recompiles
            hints = variants.hint_fakes()
            variants.variant(hints, hints)
            self.last_variants = variants
            return variants

        compiled = capture.functionalize(gm, example_inputs, compile_fn)
        tracing = False
        for r in runners:  # inductor runs here, outside the trace's composite-op override
            r.finish()
        return compiled

    def _per_size(
        self,
        gm: fx.GraphModule,
        example_inputs: list[Any],
        names: list[str],
        training: bool,
        whole: bool = False,
    ) -> Callable[..., Any]:
        """A symbolically captured graph that is functionalized again for each set of sizes."""

        def compile_static(fakes: tuple[Any, ...]) -> Callable[..., Any]:
            # Outside Dynamo's tracing context: AOTAutograd would take its (symbolic) fake mode
            with torch._guards.tracing(None), unset_fake_temporarily():
                if training:
                    return self._compile_training(gm, list(fakes), next(self._ids), names)
                return self._functionalized(gm, list(fakes), next(self._ids), names, whole)

        fakes = [n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"]
        variants = dynamic.PerSizeTrace(fakes, compile_static)
        variants.limit = self.config.max_recompiles
        variants.variant([dynamic.hint(x) for x in example_inputs])
        self.last_variants = variants
        return variants

    def _compile_training(
        self, gm: fx.GraphModule, example_inputs: list[Any], graph_id: int, names: list[str]
    ) -> Callable[..., Any]:
        """Plan and rewrite the functional forward (traced without autograd), then let
        AOTAutograd differentiate the rewritten graph (`cpfx.training`)."""
        from cpfx import training

        training.refuse_unsupported(self.config, self.mesh_info)
        checkpointed = training.checkpointed_modules(gm)
        rewritten: list[fx.GraphModule] = []

        def compile_fn(aten_gm: fx.GraphModule, inputs: list[Any]) -> Callable[..., Any]:
            if training.output_count(aten_gm) != training.output_count(gm):
                raise CpfxError(
                    "cpfx: this graph writes to its inputs or buffers (in-place updates that "
                    "AOTAutograd returns as extra outputs); cpfx computes gradients only through "
                    "graphs without such writes. Call the model under torch.no_grad(), or move "
                    "the write out of the forward."
                )
            runner = self.compile_aten(aten_gm, inputs, graph_id, names, training=True)
            rewritten.append(runner.gm)
            return runner

        with torch.no_grad():
            capture.functionalize(gm, example_inputs, compile_fn)
        (parallel,) = rewritten
        training.tag_recompute(parallel, checkpointed)
        return training.derive_backward(parallel, example_inputs, self.config.compile)

    def compile_aten(
        self,
        gm: fx.GraphModule,
        example_inputs: list[Any],
        graph_id: int = 0,
        input_names: list[str] | None = None,
        training: bool = False,
    ) -> GraphRunner:
        """Run the pipeline on one functional ATen graph; return what executes it."""
        config = self.config
        inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if input_names and len(input_names) == len(inputs):  # AOTAutograd keeps the inputs' order
            for n, name in zip(inputs, input_names):
                n.meta["cpfx_input"] = name
        fake_mode = (
            dynamic.fake_mode_of(example_inputs)
            or detect_fake_mode(example_inputs)
            or FakeTensorMode(allow_non_fake_inputs=True)
        )
        fake = tuple(
            fake_mode.from_tensor(x) if isinstance(x, torch.Tensor) and not _is_fake(x) else x
            for x in example_inputs
        )
        ctx = PassContext(config, self.mesh_info, graph_id, fake, fake_mode, training)
        reference = copy.deepcopy(gm) if config.verify else None
        passes = build_pipeline(config)
        from torch._dispatch.python import no_python_dispatcher

        # AOTAutograd compiles with its fake mode and the Python dispatcher on. The passes' own
        # cross-rank checks are real gloo collectives: with the Python dispatcher on, a collective
        # is issued holding the GIL while gloo's worker thread, freeing the previous collective's
        # tensors, waits for the GIL under gloo's queue lock: a deadlock (seen intermittently).
        with unset_fake_temporarily(), no_python_dispatcher():
            gm = run_passes(gm, ctx, passes)
        self.graphs.append(gm)
        keep = any(p.sets_schedule for p in active_passes(passes, config))
        return GraphRunner(gm, ctx, reference, keep)


class GraphRunner:
    """What AOTAutograd calls for one rewritten graph: the graph itself, or inductor's code for it
    (`finish()` compiles it once the trace is over), checked on its first call with `verify`."""

    _boxed_call = True  # AOTAutograd passes the arguments as one list

    def __init__(
        self, gm: fx.GraphModule, ctx: PassContext, reference: fx.GraphModule | None, keep: bool
    ) -> None:
        self.gm, self.ctx, self.reference, self.keep_schedule = gm, ctx, reference, keep
        self.fn: Callable[..., Any] = gm.forward
        self.resident_outputs: dict[int, Any] = gm.meta.get("cpfx_resident_outputs", {})
        """Output positions holding this rank's token shards (regional blocks): (dim, layout)."""
        self.resident_echo: frozenset[int] = gm.meta.get("cpfx_resident_echo", frozenset())
        """Output positions that are a token shard the graph was handed, unchanged."""
        self.resident_ok = False
        """Set when this graph is a whole block call (known at compile time, or once a block call
        ran this graph alone): its shards may then stay resident."""

    def finish(self) -> None:
        if not self.ctx.config.compile:
            from cpfx.fastcall import fast_module

            self.fn = fast_module(self.gm).forward
        else:
            from cpfx.inductor import compile_with_inductor

            # compile_fx returns a function of unboxed arguments (whatever its `_boxed_call` says:
            # aot_module_simplified copies the attribute from the boxed function it wraps).
            self.fn = compile_with_inductor(
                self.gm, list(self.ctx.fake_inputs), self.keep_schedule
            )
        if self.reference is not None:
            from cpfx.verify import verify_first_call

            self.fn = verify_first_call(self.fn, self.gm, self.reference, self.ctx)

    def __call__(self, args: list[Any]) -> Any:
        out = self.fn(*args)
        if not self.ctx.config.regional:
            return out
        if resident.state.block is not None:  # every graph of the block call counts
            resident.state.block.append(self)
        if not self.resident_outputs:
            return out
        keep = self.resident_ok and resident.state.in_model > 0
        return resident.wrap_outputs(
            out, self.resident_outputs, self.ctx.mesh.cp_group, keep, self.resident_echo
        )


def _input_name(n: fx.Node) -> str:
    """The user-facing name of a Dynamo graph input: `L_hidden_states_` -> `hidden_states`,
    `L_self_modules_x_embedder_parameters_weight_` -> `x_embedder.weight`."""
    name = n.name
    for prefix in ("L_self_", "l_self_", "L_", "l_"):
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    name = name.rstrip("_")
    for prefix in ("kwargs_", "args_"):
        name = name[len(prefix):] if name.startswith(prefix) else name
    for part in ("modules_", "parameters_", "buffers_"):
        name = name.replace(part, ".")
    return name.strip(".").replace("_.", ".")


def _is_fake(x: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(x, FakeTensor)


def _records_autograd(example_inputs: list[Any]) -> bool:
    return torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs
    )


def backend(mesh: DeviceMesh | None = None, config: ParallelConfig | None = None) -> CpfxBackend:
    """A Dynamo backend callable that parallelizes every graph it receives."""
    return CpfxBackend(mesh, config)


def cpfx_backend(gm: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
    """Entry-point backend: Ulysses over the default process group, default config."""
    global _default
    if _default is None:
        _default = backend()
    return _default(gm, example_inputs)


_default: CpfxBackend | None = None
