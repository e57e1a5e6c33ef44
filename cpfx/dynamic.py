"""One captured graph for every resolution: Dynamo and AOTAutograd trace with symbolic sizes; cpfx
plans and rewrites a static graph per concrete size.

Every cpfx decision (which dim is the token dim, how it splits over the ranks, padding for uneven
lengths, head groups, whether an attention is too short to split) depends on the concrete sizes,
and the rewritten graph holds them as constants, so it stays static. What a new resolution used
to repeat in full, Dynamo's bytecode tracing and AOTAutograd's functionalization, it no longer
does: the functional ATen graph is traced once with symbolic sizes (`ShapeVariants`), and each
new set of sizes gets a copy in which every size expression is evaluated (`specialize`), then
cpfx's passes, as for any static graph.

Sizes are bound from the graph inputs only (tensor dims and int inputs that are plain symbols);
a graph whose sizes cannot all be evaluated from them (data-dependent sizes) is re-traced per
size by AOTAutograd instead (`PerSizeTrace`): slower, equally exact.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

import sympy  # type: ignore[import-untyped]
import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
from torch.utils._pytree import tree_map

from cpfx.debug import counters

log = logging.getLogger(__name__)

SYM_TYPES = (torch.SymInt, torch.SymFloat, torch.SymBool)


MARK_CALLS = 6
"""Calls of each input signature whose inputs get their dims marked (the calls that compile: the
first, and in regional mode the few after it that compile the block graphs for token shards)."""


def mark_sizes(tree: Any) -> None:
    """Mark for Dynamo as symbolic (`maybe_mark_dynamic`: tracing may still specialize them)
    every dim longer than one of the tensors in `tree` other than parameters. Dims that meet a
    weight (hidden, head, channel sizes) specialize as they are traced; token lengths, frames and
    the like stay symbolic. The same dims are marked at every resolution (Dynamo guards on which
    dims were marked), and a dim of length one stays static (as Dynamo's own rule has it)."""
    from torch._dynamo import maybe_mark_dynamic
    from torch.utils._pytree import tree_leaves

    for t in tree_leaves(tree):
        if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter):
            for d, n in enumerate(t.shape):
                if n > 1:
                    maybe_mark_dynamic(t, d)


class NotSpecializable(Exception):
    """A size of the graph is not a function of the input sizes."""


def is_symbolic(inputs: list[Any]) -> bool:
    """Whether any of a graph's example inputs has a symbolic size (or is a symbolic int)."""
    for x in inputs:
        if isinstance(x, SYM_TYPES):
            return True
        if isinstance(x, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in x.shape):
            return True
    return False


def _slots(fakes: list[Any]) -> tuple[list[tuple[int, int, bool]], list[int]]:
    """Where the symbols live: (input, dim, is_stride) of tensor inputs, and the scalar inputs
    (symbolic ints, floats and bools)."""
    dims: list[tuple[int, int, bool]] = []
    scalars: list[int] = []
    for i, f in enumerate(fakes):
        if isinstance(f, SYM_TYPES):
            scalars.append(i)
        elif isinstance(f, torch.Tensor):
            for d, s in enumerate(f.shape):
                if isinstance(s, torch.SymInt):
                    dims.append((i, d, False))
            for d, s in enumerate(f.stride()):
                if isinstance(s, torch.SymInt):
                    dims.append((i, d, True))
    return dims, scalars


def _key(dims: list[tuple[int, int, bool]], scalars: list[int], args: Any) -> tuple[Any, ...]:
    """The values at the symbolic places of these arguments (what selects a variant)."""
    k: list[Any] = [args[i].stride(d) if st else args[i].shape[d] for i, d, st in dims]
    k += [args[i] for i in scalars]
    return tuple(k)


def bind(fakes: list[Any], args: list[Any]) -> dict[sympy.Symbol, Any]:
    """Values of the input symbols for these concrete arguments."""
    out: dict[sympy.Symbol, Any] = {}
    for f, a in zip(fakes, args):
        if isinstance(f, SYM_TYPES):
            e = f.node.expr
            if isinstance(e, sympy.Symbol):
                out[e] = a
        elif isinstance(f, torch.Tensor) and isinstance(a, torch.Tensor):
            for s, v in list(zip(f.shape, a.shape)) + list(zip(f.stride(), a.stride())):
                if isinstance(s, torch.SymInt) and isinstance(s.node.expr, sympy.Symbol):
                    out[s.node.expr] = int(v)
    return out


def evaluate(x: Any, values: dict[sympy.Symbol, Any]) -> Any:
    """The concrete value of a symbolic int, float or bool (plain values pass through)."""
    if not isinstance(x, SYM_TYPES):
        return x
    e = x.node.expr.xreplace(values)
    if getattr(e, "free_symbols", None):
        raise NotSpecializable(f"{x.node.expr} depends on {sorted(map(str, e.free_symbols))}")
    if isinstance(x, torch.SymBool):
        return bool(e)
    if isinstance(x, torch.SymInt):
        return int(e)
    return float(e)


def check_bound(fakes: list[Any], args: list[Any], values: dict[sympy.Symbol, Any]) -> None:
    """Every input's symbolic size evaluates to the argument's (an input size that is an
    expression of others, such as `s0 + 16`, is checked, not bound)."""
    for f, a in zip(fakes, args):
        if isinstance(f, torch.Tensor) and isinstance(a, torch.Tensor):
            shape = [evaluate(s, values) for s in f.shape]
            if shape != list(a.shape):
                raise NotSpecializable(f"input sized {list(f.shape)} got {list(a.shape)}")


def specialize(gm: fx.GraphModule, values: dict[sympy.Symbol, Any]) -> fx.GraphModule:
    """A copy of the functional ATen graph `gm` (traced with symbolic sizes) in which every size
    computation is replaced by its value under `values` and every size assertion is checked and
    dropped: the graph a static trace at those sizes gives. Tensor values (`meta["val"]`) are
    dropped (they are symbolic); the caller propagates static ones."""
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}

    def arg(a: Any) -> Any:
        return env[a] if isinstance(a, fx.Node) else a

    for n in gm.graph.nodes:
        val = n.meta.get("val")
        if n.op == "placeholder":
            new = graph.placeholder(n.target)
            new.meta = {k: v for k, v in n.meta.items() if k not in ("val", "tensor_meta")}
            # a size input stays an input (the caller passes it) but its uses take its value
            env[n] = evaluate(val, values) if isinstance(val, SYM_TYPES) else new
            continue
        if n.op == "output":
            graph.output(tree_map(arg, n.args[0]))
            continue
        if isinstance(val, SYM_TYPES) or (
            n.op == "call_function" and isinstance(val, (int, float, bool))
        ):
            env[n] = evaluate(val, values)
            continue
        if n.op == "call_function" and _is_assertion(n):
            cond = tree_map(arg, n.args)[0]
            if isinstance(cond, SYM_TYPES):
                cond = evaluate(cond, values)
            if cond is False:
                raise NotSpecializable(f"size assertion {n.args[1:]!r} fails at these sizes")
            continue
        if isinstance(val, torch.Tensor) and free_unbacked_symbols(val):
            raise NotSpecializable(f"{n.name} has a data-dependent size")
        new = graph.create_node(
            n.op, n.target, tree_map(arg, n.args), tree_map(arg, n.kwargs), n.name
        )
        new.meta = {k: v for k, v in n.meta.items() if k not in ("val", "tensor_meta")}
        env[n] = new
    out = fx.GraphModule(gm, graph)
    out.meta.update(gm.meta)
    return out


def fake_mode_of(inputs: Any) -> Any:
    """The fake mode of the first fake tensor in `inputs` (not the tracing context's, which
    `detect_fake_mode` prefers), or None."""
    from torch._subclasses.fake_tensor import FakeTensor

    for x in inputs:
        if isinstance(x, FakeTensor):
            return x.fake_mode
    return None


def propagate(gm: fx.GraphModule, fakes: tuple[Any, ...]) -> None:
    """Static `meta["val"]` of every node, from static fake inputs."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    with unset_fake_temporarily(), torch.no_grad():  # AOTAutograd's own fake mode is active
        FakeTensorProp(gm, fake_mode_of(fakes)).propagate_dont_convert_inputs(*fakes)


def _is_assertion(n: fx.Node) -> bool:
    name = getattr(n.target, "__name__", "")
    return any(
        name.startswith(p)
        for p in ("_assert_scalar", "sym_constrain_range", "_assert_async", "sym_constrain")
    )


def hint(x: Any) -> Any:
    """A symbolic scalar's traced value (without guarding on it); anything else as it is."""
    if not isinstance(x, SYM_TYPES):
        return x
    return x.node.pytype(x.node.hint) if x.node.hint is not None else x


def static_fakes(args: list[Any]) -> tuple[Any, ...]:
    """Static fake tensors (a fresh fake mode) for concrete arguments."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    return tuple(
        mode.from_tensor(a, static_shapes=True) if isinstance(a, torch.Tensor) else a
        for a in args
    )


class _Variants:
    """Compiled variants of one symbolically captured graph, one per set of values at its
    symbolic places (`key`), compiled once under `lock` by `_build` within `guard`. `last` (per
    thread) is the variant that ran last; `on_variant` hears of each new one."""

    counter = ""

    def __init__(self, fakes: list[Any]) -> None:
        self.fakes = list(fakes)
        self.dims, self.scalars = _slots(self.fakes)
        self.variants: collections.OrderedDict[tuple[Any, ...], Any] = collections.OrderedDict()
        """Compiled variants, least recently used first."""
        self.limit: int | None = None
        """How many variants are kept (the least recently used beyond it is dropped, and compiled
        again if its sizes come back); None: all."""
        self.lock = threading.Lock()
        self.on_variant: Callable[[Any], None] | None = None
        self.on_evict: Callable[[Any], None] | None = None
        self.guard: Callable[[], Any] = contextlib.nullcontext
        """Context around compiling a variant at run time (the runtime's failure announcement)."""
        self._tls = threading.local()

    def key(self, args: Any) -> tuple[Any, ...]:
        return _key(self.dims, self.scalars, args)

    def variant(self, args: Any, fakes: tuple[Any, ...] | None = None) -> Any:
        """The compiled variant for these arguments (compiled now if new; `fakes`: their static
        fake values, when the caller has them)."""
        k = self.key(args)  # every symbolic value: a variant bakes them all in
        with self.lock:
            v = self.variants.get(k)
            if v is not None:
                self.variants.move_to_end(k)
                return v
            with self.guard():
                v = self._build(list(args), fakes)
            self.variants[k] = v
            counters["dynamic"][self.counter] += 1
            if self.on_variant is not None:
                self.on_variant(v)
            while self.limit is not None and len(self.variants) > max(self.limit, 1):
                _, old = self.variants.popitem(last=False)
                counters["dynamic"]["evicted"] += 1
                if self.on_evict is not None:
                    self.on_evict(old)
        return v

    def _build(self, args: list[Any], fakes: tuple[Any, ...] | None) -> Any:
        raise NotImplementedError

    def _run(self, args: Any) -> Any:
        v = self.variant(args)
        self._tls.last = v
        return v

    @property
    def last(self) -> Any:
        return getattr(self._tls, "last", None)


class ShapeVariants(_Variants):
    """AOTAutograd's forward for one symbolically traced graph: a rewritten static graph per set
    of input sizes, compiled on first use by `compile_variant(specialized_gm, static_fakes)`."""

    _boxed_call = True
    counter = "variants"

    def __init__(
        self,
        gm: fx.GraphModule,
        fakes: list[Any],
        compile_variant: Callable[[fx.GraphModule, tuple[Any, ...]], Any],
    ) -> None:
        super().__init__(fakes)
        self.gm, self.compile_variant = gm, compile_variant

    def hint_fakes(self) -> tuple[Any, ...]:
        """Static fake inputs at the traced sizes (Dynamo traces with the current call's sizes as
        the symbols' hints): the first variant is compiled from these, at capture time."""
        from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

        values: dict[sympy.Symbol, Any] = {}
        for f in self.fakes:
            syms = [f] if isinstance(f, SYM_TYPES) else (
                list(f.shape) + list(f.stride()) if isinstance(f, torch.Tensor) else []
            )
            for s in syms:
                if isinstance(s, SYM_TYPES) and isinstance(s.node.expr, sympy.Symbol):
                    values[s.node.expr] = hint(s)
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        out: list[Any] = []
        with unset_fake_temporarily(), mode:
            for f in self.fakes:
                if isinstance(f, torch.Tensor):
                    t = torch.empty_strided(
                        [evaluate(s, values) for s in f.shape],
                        [evaluate(s, values) for s in f.stride()],
                        dtype=f.dtype,
                        device=f.device,
                    )
                    out.append(t)
                else:
                    out.append(evaluate(f, values))
        return tuple(out)

    def _build(self, args: list[Any], fakes: tuple[Any, ...] | None) -> Any:
        values = bind(self.fakes, args)
        check_bound(self.fakes, args, values)
        gm = specialize(self.gm, values)
        if fakes is None:
            fakes = static_fakes(args)
        propagate(gm, fakes)
        v = self.compile_variant(gm, fakes)
        log.info("cpfx: sizes %s: new static variant (%d in all)", _describe(values),
                 len(self.variants) + 1)
        return v

    def __call__(self, args: list[Any]) -> Any:
        return self._run(args)(args)


def _describe(values: dict[sympy.Symbol, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(values.items(), key=lambda kv: str(kv[0])))


class PerSizeTrace(_Variants):
    """A symbolically captured Dynamo graph compiled per set of sizes from the start
    (`compile_static(static_fake_inputs)`, which re-traces it with AOTAutograd): for graphs
    `ShapeVariants` cannot serve (training, data-dependent sizes)."""

    counter = "retraced"

    def __init__(
        self, fakes: list[Any], compile_static: Callable[[tuple[Any, ...]], Callable[..., Any]]
    ) -> None:
        super().__init__(fakes)
        self.compile_static = compile_static

    def _build(self, args: list[Any], fakes: tuple[Any, ...] | None) -> Any:
        return self.compile_static(fakes if fakes is not None else static_fakes(args))

    def __call__(self, *args: Any) -> Any:
        # unboxed: what aot_module_simplified and compile_fx return takes the arguments as they
        # are (whatever `_boxed_call` they copy from the boxed function they wrap)
        return self._run(args)(*args)
