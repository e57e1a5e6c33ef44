"""Token rules: for one ATen op and the placements of its tensor operands, where its output lives.

A rule sees an `OpCall` (the op, its arguments with every tensor operand replaced by an `Operand`
carrying shape, dtype and placement, the output shape, this rank) and returns a `Decision`:

- `needs`: the placement each operand must have (the applier slices, gathers or re-slices
  operands whose placement differs: `Replicate -> Shard` is a free slice, `Shard -> Replicate` an
  all-gather);
- `out`: the placement of the output (a tuple for ops that return several tensors);
- `args` / `kwargs` / `target`: the local call, when it differs from the global one (a view's
  shape with the local token count, a slice's local bounds, a placeholder for attention).

The world is closed: an op with no rule, or whose rule returns None, gets every operand gathered
and a replicated output. That is always exact. A rule that claims a sharded output is proven by
`tests/test_rules.py`, which runs the local call on every rank's shards and compares it with the
shard of the global result, for every registered op.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from cpfx.sharding.placement import REPLICATE, Placement, Shard

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class Operand:
    """A tensor argument as a rule sees it."""

    index: int
    """Position among the op's tensor operands (flattened args, then kwargs)."""
    shape: tuple[int, ...]
    dtype: torch.dtype
    placement: Placement
    cheap: bool = False
    """Its global value can be rebuilt without communication (re-slicing it is free)."""

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def shard(self) -> Shard | None:
        return self.placement if isinstance(self.placement, Shard) else None


@dataclasses.dataclass
class OpCall:
    target: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    out: Any
    """Output shape (tuple of ints), a list of them for multi-output ops, or None."""
    operands: list[Operand]
    rank: int
    world: int
    where: str = ""
    """The model source of the op, for messages."""

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        if len(self.args) > i:
            return self.args[i]
        return self.kwargs.get(name, default)

    @property
    def sharded(self) -> list[tuple[Operand, Shard]]:
        """The sharded operands, each with its sharding."""
        return [(o, o.placement) for o in self.operands if isinstance(o.placement, Shard)]

    def keep(self) -> tuple[Placement, ...]:
        """Every operand as it is."""
        return tuple(o.placement for o in self.operands)


@dataclasses.dataclass
class Decision:
    needs: tuple[Placement, ...]
    out: Placement | tuple[Placement, ...]
    args: tuple[Any, ...] | None = None
    """Local positional args (operands still as `Operand`s); None: the global ones."""
    kwargs: dict[str, Any] | None = None
    target: Any = None
    """Local callable (an op or a plain function); None: the same op."""
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Extra node metadata for the local node (e.g. the attention site)."""
    rule: str = ""


Rule = Callable[[OpCall], Decision | None]
_RULES: dict[Any, Rule] = {}


def register(*ops: Any) -> Callable[[Rule], Rule]:
    """Register a rule for ATen overloads (or whole overload packets)."""

    def deco(fn: Rule) -> Rule:
        for op in ops:
            _RULES[op] = fn
        return fn

    return deco


def rule_for(target: Any) -> Rule | None:
    if target in _RULES:
        return _RULES[target]
    packet = getattr(target, "overloadpacket", None)
    if packet is not None and packet in _RULES:
        return _RULES[packet]
    from cpfx.sharding.rules import pointwise as pw

    return pw.pointwise if pw.is_pointwise(target) else None


def registered_ops() -> list[Any]:
    return list(_RULES)


def n_outputs(call: OpCall) -> int | None:
    return len(call.out) if isinstance(call.out, list) else None


def out_shapes(call: OpCall) -> list[tuple[int, ...]]:
    """The output shapes of a multi-output op."""
    assert isinstance(call.out, list), call.out
    return call.out


def all_replicated(call: OpCall, rule: str = "gather") -> Decision:
    """The safe answer: every operand gathered, every output replicated."""
    k = n_outputs(call)
    out = REPLICATE if k is None else tuple(REPLICATE for _ in range(k))
    return Decision(tuple(REPLICATE for _ in call.operands), out, rule=rule)


def decide(call: OpCall) -> Decision:
    """The decision for one op call (see the module doc)."""
    if not call.sharded:
        keep = all_replicated(call, rule="replicated")
        keep.needs = call.keep()
        return keep
    rule = rule_for(call.target)
    d = rule(call) if rule is not None else None
    if d is None:
        return all_replicated(call, rule="gather: no rule" if rule is None else "gather")
    d.rule = d.rule or getattr(rule, "__name__", "rule")
    return d


def norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def out_shape(call: OpCall) -> tuple[int, ...]:
    assert isinstance(call.out, tuple), call.out
    return call.out


# Rules register themselves on import.
from cpfx.sharding.rules import attention, compute, pointwise, views  # noqa: E402,F401
