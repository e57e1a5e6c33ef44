"""Each binding `cpfx.fastcall` calls instead of an ATen overload computes what the overload does
(values, dtype, shape, strides), for the argument forms ATen graphs hold."""

from __future__ import annotations

import pytest
import torch
from torch import fx

from cpfx.fastcall import BINDINGS, fast_module

pytestmark = pytest.mark.graph

aten = torch.ops.aten
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 3, 4, generator=g)
y = torch.randn(2, 3, 4, generator=g)
w = torch.randn(5, 4, generator=g)
b = torch.randn(5, generator=g)
m = torch.randn(4, 6, generator=g)
s = torch.randn(3, 4, generator=g)
pos = torch.rand(2, 3, 4, generator=g) + 0.5

CASES: dict[torch._ops.OpOverload, list[tuple[tuple, dict]]] = {
    aten.add.Tensor: [((x, y), {}), ((x, 2.0), {}), ((x, y), {"alpha": 3})],
    aten.addmm.default: [((b, s, w.T), {})],
    aten.bmm.default: [((x, x.transpose(1, 2)), {})],
    aten.cat.default: [(([x, y],), {}), (([x, y], 2), {}), (([x, y], -1), {})],
    aten.clone.default: [
        ((x.transpose(0, 2),), {}),
        ((x.transpose(0, 2),), {"memory_format": torch.contiguous_format}),
    ],
    aten.cos.default: [((x,), {})],
    aten.div.Tensor: [((x, pos), {}), ((x, 3), {}), ((torch.arange(6), 4), {})],
    aten.div.Tensor_mode: [((x, pos), {"rounding_mode": "floor"})],
    aten.exp.default: [((x,), {})],
    aten.expand.default: [((x[:, :1], [2, 3, 4]), {}), ((x, [-1, 3, 4]), {})],
    aten.gelu.default: [((x,), {}), ((x,), {"approximate": "tanh"})],
    aten.layer_norm.default: [((x, [4]), {}), ((x, [4], b[:4], b[1:], 1e-6), {})],
    aten.linear.default: [((x, w), {}), ((x, w, b), {})],
    aten.mm.default: [((s, m), {})],
    aten.mul.Tensor: [((x, y), {}), ((x, 0.5), {}), ((torch.arange(4), 2.5), {})],
    aten.neg.default: [((x,), {})],
    aten.permute.default: [((x, [2, 0, 1]), {})],
    aten.pow.Tensor_Scalar: [((x, 2), {}), ((pos, 0.5), {})],
    aten.reciprocal.default: [((pos,), {})],
    aten.reshape.default: [((x, [6, 4]), {}), ((x.transpose(0, 1), [-1]), {})],
    aten.rms_norm.default: [((x, [4]), {}), ((x, [4], b[:4], 1e-6), {})],
    aten.rsqrt.default: [((pos,), {})],
    aten.select.int: [((x, 1, 2), {}), ((x, -1, 0), {})],
    aten.sigmoid.default: [((x,), {})],
    aten.silu.default: [((x,), {})],
    aten.sin.default: [((x,), {})],
    aten.split_with_sizes.default: [((x, [1, 3], 2), {}), ((x, [1, 1]), {})],
    aten.squeeze.dim: [((x[:, :1], 1), {}), ((x, 0), {})],
    aten.stack.default: [(([x, y],), {}), (([x, y], -1), {})],
    aten.sub.Tensor: [((x, y), {}), ((x, 1.5), {}), ((x, y), {"alpha": 2})],
    aten.tanh.default: [((x,), {})],
    aten.transpose.int: [((x, 0, 2), {})],
    aten.unbind.int: [((x,), {}), ((x, 2), {})],
    aten.unsqueeze.default: [((x, 0), {}), ((x, -1), {})],
    aten.view.default: [((x, [6, 4]), {}), ((x, [-1, 2]), {})],
    aten.where.self: [((x > 0, x, y), {})],
}


def _same(a, b) -> None:
    if isinstance(a, (list, tuple)):  # a tuple for a list: graphs only index them (getitem)
        assert isinstance(b, (list, tuple)) and len(a) == len(b)
        for p, q in zip(a, b):
            _same(p, q)
        return
    assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
    assert torch.equal(a, b)


def test_every_binding_has_cases():
    assert set(CASES) == set(BINDINGS)


@pytest.mark.parametrize("op", sorted(BINDINGS, key=str), ids=str)
def test_binding_matches_overload(op):
    for args, kwargs in CASES[op]:
        _same(BINDINGS[op](*args, **kwargs), op(*args, **kwargs))


def test_fast_module_rebinds_a_copy():
    graph = fx.Graph()
    a = graph.placeholder("a")
    wt = graph.placeholder("wt")
    u = graph.call_function(aten.unsqueeze.default, (a, 0))
    e = graph.call_function(aten.expand.default, (u, [3, 4, 8]))
    s_ = graph.call_function(aten.slice.Tensor, (e, 2, 0, 4))  # not bound: left as it is
    graph.output(graph.call_function(aten.linear.default, (s_, wt)))
    gm = fx.GraphModule(torch.nn.Module(), graph)
    fast = fast_module(gm)
    t = torch.randn(4, 8)
    _same(fast(t, w), gm(t, w))
    targets = [n.target for n in fast.graph.nodes if n.op == "call_function"]
    assert aten.slice.Tensor in targets and aten.unsqueeze.default not in targets
    assert aten.unsqueeze.default in [n.target for n in gm.graph.nodes]  # original unchanged


@pytest.mark.parametrize("target", [
    torch.ops._c10d_functional.wait_tensor.default, torch.ops._c10d_functional.wait_tensor,
], ids=["overload", "packet"])
def test_collectives_called_past_their_autograd_kernel(target):
    """The lowering names collectives by their packet or their overload: both are called past
    their Python autograd kernel (which costs more than the call itself when nothing records
    autograd), and keep the op they stand for (`op_of`, for error messages)."""
    from cpfx.fastcall import op_of

    graph = fx.Graph()
    a = graph.placeholder("a")
    graph.output(graph.call_function(target, (a,)))
    fast = fast_module(fx.GraphModule(torch.nn.Module(), graph))
    (n,) = [n for n in fast.graph.nodes if n.op == "call_function"]
    assert n.target.__name__ == "_c10d_functional_wait_tensor_below_autograd"
    assert op_of(n) is target
    t = torch.randn(3)
    _same(fast(t), t)
