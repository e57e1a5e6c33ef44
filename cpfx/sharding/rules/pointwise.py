"""Pointwise ops: each output element depends on the same (broadcast) element of every operand.

A token dim of any operand maps to the output dim it is aligned with (broadcasting aligns shapes
from the right). All operands that carry that output dim at full length must hold the same items:
one layout is chosen (an operand whose global value cannot be rebuilt for free wins), the others
are sliced (replicated ones) or re-sliced to it; operands that broadcast along it stay replicated.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from cpfx.sharding.placement import REPLICATE, Placement, Shard
from cpfx.sharding.rules import Decision, OpCall, aten, out_shape, register

# ATen ops that are elementwise with broadcasting but lack `Tag.pointwise`.
_EXTRA = {
    aten._to_copy.default,
    aten.alias.default,
    aten.copy.default,
    aten.detach.default,
    aten.lift_fresh_copy.default,
    aten.fill.Scalar,
    aten.fill.Tensor,
    aten.floor_divide.default,
    aten.empty_like.default,
    aten.zeros_like.default,
    aten.ones_like.default,
    aten.full_like.default,
}


@functools.cache
def is_pointwise(target: Any) -> bool:
    if target in _EXTRA:
        return True
    if not isinstance(target, torch._ops.OpOverload):
        return False
    tags = target.tags
    return torch.Tag.pointwise in tags and torch.Tag.nondeterministic_seeded not in tags


def pointwise(call: OpCall) -> Decision | None:
    out = out_shape(call)
    O = len(out)
    cands = []
    for o, sh in call.sharded:
        od = sh.dim + O - o.ndim
        if o.shape[sh.dim] == out[od]:  # a sharded dim that broadcasts must be gathered
            cands.append((od, o, sh))
    if not cands:
        return None
    od, _, anchor = next(((d, o, sh) for d, o, sh in cands if not o.cheap), cands[0])
    layout = anchor.layout
    needs: list[Placement] = []
    for o in call.operands:
        k = od - (O - o.ndim)
        if k >= 0 and o.shape[k] == out[od]:
            needs.append(Shard(k, layout))
        else:
            needs.append(REPLICATE)
    return Decision(tuple(needs), Shard(od, layout))


register(*_EXTRA)(pointwise)
