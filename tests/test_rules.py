"""Every token rule, proven by a differential test: the op on each rank's shards equals each
rank's shard of the op on the whole (`test_view_ops.py` style, one process, seconds).

For each sample call (global tensors) and each way of sharding its operands (one operand along
each of its dims, or all same-length operands alike; even, uneven, segmented and scrambled
layouts over 3 ranks), every rank asks the rule for a decision, redistributes the global operands
to the placements the rule needs, runs the local call, and compares the result with its share of
the global result under the placement the rule claims.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils import _pytree as pytree

import cpfx.ops  # noqa: F401
from cpfx.halo import conv_rows, halo_convolution
from cpfx.graph_utils import sdpa_args
from cpfx.sharding import rules
from cpfx.sharding.layout import Layout
from cpfx.sharding.placement import (
    REPLICATE,
    Partial,
    Replicate,
    Shard,
    local_value,
    reduce_partials,
)
from cpfx.sharding.rules import OpCall, Operand

aten = torch.ops.aten
WORLD = 3


def layouts(n: int) -> list[Layout]:
    out = [Layout.even(n, WORLD)]
    if n >= 4:
        a = n // 3
        out.append(Layout.even(a, WORLD).concat(Layout.even(n - a, WORLD)))  # [txt | img]
        out.append(Layout.even(n, WORLD).reversed())
        # rank 1 holds nothing, rank 0 two runs
        out.append(Layout.make(n, [[(0, 1), (n - 1, 1)], [], [(1, n - 2)]]))
    return out


def t(*shape: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + sum(shape))
    if dtype == torch.bool:
        return torch.rand(*shape, generator=g) > 0.3
    if dtype == torch.long:
        return torch.randint(0, 6, shape, generator=g)
    return torch.randn(*shape, generator=g).to(dtype)


def _make_call(op, args, kwargs, placements, rank) -> OpCall:
    tensors = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
    ops = [
        Operand(i, tuple(x.shape), x.dtype, placements.get(i, REPLICATE))
        for i, x in enumerate(tensors)
    ]
    it = iter(ops)
    a, k = pytree.tree_map(
        lambda x: next(it) if isinstance(x, torch.Tensor) else x, (args, kwargs)
    )
    out = op(*args, **kwargs)
    if out is None:
        shape = None
    elif isinstance(out, (tuple, list)):
        shape = [tuple(o.shape) for o in out]
    else:
        shape = tuple(out.shape)
    return OpCall(op, a, k, shape, ops, rank, WORLD, "test")


def _simulate_attention(local, call, dec, tensors, rank):
    """What the lowering must compute for a `cpfx::sharded_attention` placeholder: this rank's
    queries against all keys (the global K/V and mask, the mask's rows for these queries)."""
    site = dec.meta["cpfx_attn"]
    a = sdpa_args(call.args, call.kwargs)
    q = local[a["query"].index]
    k, v = tensors[a["key"].index], tensors[a["value"].index]
    mask = tensors[a["attn_mask"].index] if isinstance(a["attn_mask"], Operand) else None
    pieces = site.q_layout.pieces(rank)
    if site.causal:
        rows = torch.cat([torch.arange(s, s + n) for s, n in pieces]) if pieces else torch.zeros(0)
        mask = rows[:, None] >= torch.arange(k.shape[-2])[None, :]
    elif mask is not None and mask.shape[-2] > 1:
        mask = local_value(mask, Shard(mask.ndim - 2, site.q_layout), rank)
    if q.shape[-2] == 0:
        return q.new_zeros(*q.shape[:-1], v.shape[-1])
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=site.scale, enable_gqa=site.enable_gqa
    )


def _simulate_halo(dec, tensors, rank):
    """What `halo_convolution` computes on `rank`: the convolution over the input rows its halo
    exchange assembles ([a, b) of the global input), cut to its output rows."""
    x, *rest = dec.args
    halo = dec.args[3]
    assert halo.rank == rank
    _, _, a, b = halo.span(rank)
    rows = tensors[0].narrow(halo.dim, a, b - a)
    w, bias = (tensors[o.index] if isinstance(o, Operand) else o for o in dec.args[1:3])
    return conv_rows(rows, halo, aten.convolution.default, (w, bias, *dec.args[4:]))


def _equal(got: Any, want: Any, op) -> None:
    if isinstance(want, (tuple, list)):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            _equal(g, w, op)
        return
    assert got.shape == want.shape, (op, got.shape, want.shape)
    if op in (aten.empty_like.default, aten.new_empty.default, aten.new_empty_strided.default):
        return
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)


def check(op, args, kwargs=None) -> int:
    """Prove the rule of `op` on every sharding of this call's operands; return how many
    placements it proved (claims of a sharded output)."""
    kwargs = kwargs or {}
    tensors = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
    out = op(*args, **kwargs)
    proved = 0
    for placements in _probes(tensors):
        decs = [rules.decide(_make_call(op, args, kwargs, placements, r)) for r in range(WORLD)]
        parts = []
        for r, dec in enumerate(decs):
            call = _make_call(op, args, kwargs, placements, r)
            local = [local_value(x, p, r) for x, p in zip(tensors, dec.needs)]
            if dec.target is torch.ops.cpfx.sharded_attention.default:
                got = _simulate_attention(local, call, dec, tensors, r)
            elif dec.target is halo_convolution:  # the rows the exchange brings, from the global x
                got = _simulate_halo(dec, tensors, r)
            else:
                a, k = pytree.tree_map(
                    lambda x: local[x.index] if isinstance(x, Operand) else x,
                    (dec.args if dec.args is not None else call.args,
                     dec.kwargs if dec.kwargs is not None else call.kwargs),
                )
                got = (dec.target or op)(*a, **k)
            placement = dec.out
            if isinstance(placement, Partial):  # proven over the ranks' parts, below
                assert all(d.out == placement for d in decs), (op, [d.out for d in decs])
                parts.append(got)
                continue
            want = (
                [local_value(o, p, r) for o, p in zip(out, placement)]
                if isinstance(out, (tuple, list)) else local_value(out, placement, r)
            )
            _equal(got, want, op)
        if parts:  # the all-reduce of the ranks' parts is the global value
            _equal(reduce_partials(parts, decs[0].out), out, op)
        if any(not isinstance(p, Replicate) for p in pytree.tree_leaves(decs[0].out)):
            proved += 1
    return proved


def _probes(tensors: list[torch.Tensor]):
    """Placements to try: one operand sharded along one dim; all operands sharing that length
    along the aligned dim sharded alike."""
    for i, x in enumerate(tensors):
        for d, n in enumerate(x.shape):
            if n < 2:
                continue
            for lay in layouts(n):
                yield {i: Shard(d, lay)}
                same = {
                    j: Shard(d - x.ndim + y.ndim, lay)
                    for j, y in enumerate(tensors)
                    if 0 <= d - x.ndim + y.ndim < y.ndim and y.shape[d - x.ndim + y.ndim] == n
                }
                if len(same) > 1:
                    yield same
    if len(tensors) == 2:  # two operands sharded alike along dims of one length (contractions)
        a, b = tensors
        for d, n in enumerate(a.shape):
            for e, m in enumerate(b.shape):
                if n == m >= 2 and d - a.ndim != e - b.ndim:
                    for lay in layouts(n):
                        yield {0: Shard(d, lay), 1: Shard(e, lay)}


# --- the sample table: one or more calls per registered op -----------------------------------

S = 7  # tokens: uneven over 3 ranks


def samples() -> dict[Any, list[tuple[tuple, dict]]]:
    x = t(2, S, 4)
    b = t(2, S, 3, 4)
    mask = t(S, S, dtype=torch.bool)
    mask[:, 0] = True
    return {
        aten.view.default: [((x, [2, S, 2, 2]), {}), ((x, [2 * S, 4]), {}), ((x, [1, 2, S, 4]), {}),
                            ((t(2 * S, 4), [2, S, 4]), {}), ((t(6, 4), [2, 3, 4]), {}),
                            ((t(6, 4), [3, 2, 4]), {}), ((x, [2, S * 4]), {})],
        aten._unsafe_view.default: [((b, [2, S, 12]), {})],
        aten.reshape.default: [((b, [2 * S, 3, 4]), {})],
        aten.expand.default: [((t(S, 1, 4), [S, 5, 4]), {}), ((t(1, S, 4), [3, S, 4]), {}),
                              ((t(S, 4), [2, -1, 4]), {})],
        aten.unsqueeze.default: [((x, 1), {}), ((x, -1), {}), ((x, 0), {})],
        aten.squeeze.dim: [((t(S, 1, 4), 1), {})],
        aten.squeeze.dims: [((t(1, S, 1, 4), [0, 2]), {})],
        aten.squeeze.default: [((t(1, S, 1, 4),), {})],
        aten.permute.default: [((b, [0, 2, 1, 3]), {})],
        aten.transpose.int: [((x, 1, 2), {}), ((x, 0, -1), {})],
        aten.t.default: [((t(S, 4),), {})],
        aten.select.int: [((x, 1, 3), {}), ((x, 0, 1), {}), ((x, 2, -1), {})],
        aten.slice.Tensor: [((x, 1, 2, 6), {}), ((x, 1, 0, 3), {}), ((x, 1, -3, None), {}),
                            ((x, 2, 1, 3), {}), ((x, 1, 1, 7, 2), {}), ((x, 1, 0, 100), {})],
        aten.split.Tensor: [((x, 3, 1), {}), ((x, 2, 2), {})],
        aten.split_with_sizes.default: [((x, [2, 5], 1), {}), ((x, [3, 1], 2), {})],
        aten.unbind.int: [((x, 0), {}), ((x, 2), {})],
        aten.cat.default: [(([x, t(2, 3, 4)], 1), {}), (([x, t(2, S, 2)], 2), {}),
                           (([t(2, 2, 4), x], -2), {})],
        aten.stack.default: [(([x, t(2, S, 4, seed=1)], 1), {}), (([x, x], 0), {})],
        aten.constant_pad_nd.default: [((x, [0, 0, 1, 2], 0.5), {}), ((x, [1, 1]), {}),
                                       ((x, [0, 0, -1, 0]), {})],
        aten.repeat.default: [((x, [1, 1, 2]), {}), ((x, [2, 1, 1, 1]), {}), ((x, [1, 2, 1]), {})],
        aten.flip.default: [((x, [1]), {}), ((x, [0, 2]), {})],
        aten.roll.default: [((x, [1], [2]), {}), ((x, [1], [1]), {})],
        aten.index.Tensor: [((t(10, 4), [t(S, dtype=torch.long)]), {}),
                            ((x, [None, None, torch.tensor([3, 0])]), {}),
                            ((x, [None, torch.tensor([1, 2])]), {})],
        aten.index_select.default: [((x, 2, torch.tensor([3, 1])), {}),
                                    ((t(10, 4), 0, t(S, dtype=torch.long)), {})],
        aten.embedding.default: [((t(10, 4), t(2, S, dtype=torch.long)), {})],
        aten.slice_scatter.default: [((t(2, S, 4), t(2, 3, 4), 1, 2, 5), {}),
                                     ((t(2, S, 4), t(2, S, 2), 2, 1, 3), {}),
                                     ((t(2, S, 4), t(2, S, 2), 2, 0, 4, 2), {})],
        aten.select_scatter.default: [((t(2, S, 4), t(2, 4), 1, 3), {}),
                                      ((t(2, S, 4), t(2, S), 2, 1), {})],
        aten.new_zeros.default: [((x, [3, 2]), {})],
        aten.new_ones.default: [((x, [3, 2]), {})],
        aten.new_full.default: [((x, [3, 2], 1.5), {})],
        aten.new_empty.default: [((x, [3, 2]), {})],
        aten.new_empty_strided.default: [((x, [3, 2], [2, 1]), {})],
        aten.view_as_complex.default: [((t(2, S, 3, 2),), {})],
        aten.view_as_real.default: [((torch.view_as_complex(t(2, S, 3, 2)),), {})],
        aten.linear.default: [((x, t(5, 4), t(5)), {}), ((x, t(5, 4)), {})],
        aten.layer_norm.default: [((x, [4], t(4), t(4), 1e-5), {})],
        aten.native_layer_norm.default: [((x, [4], t(4), t(4), 1e-5), {})],
        aten.rms_norm.default: [((x, [4], t(4), 1e-6), {})],
        aten.mm.default: [((t(S, 4), t(4, 5)), {}), ((t(3, 4), t(4, S)), {}),
                          ((t(3, S), t(S, 5)), {})],
        aten.addmm.default: [((t(5), t(S, 4), t(4, 5)), {}), ((t(S, 5), t(S, 4), t(4, 5)), {})],
        aten.bmm.default: [((t(S, 3, 4), t(S, 4, 2)), {}), ((t(2, S, 4), t(2, 4, 3)), {}),
                           ((t(2, 3, S), t(2, S, 4)), {}),
                           ((t(2, 3, 4), t(2, 4, S)), {})],
        aten.convolution.default: [
            ((t(S, 2, 5, 5), t(3, 2, 3, 3), t(3), [1, 1], [1, 1], [1, 1], False, [0, 0], 1), {}),
            # "same" convolutions over sharded rows: 3x3, a dilated 5-tall kernel, 1x1, depthwise,
            # 1-D and 3-D (rows of 7 over 3 ranks: halos longer than a shard included)
            ((t(2, 2, S, 5), t(3, 2, 3, 3), t(3), [1, 1], [1, 1], [1, 1], False, [0, 0], 1), {}),
            ((t(1, 2, S, 4), t(2, 2, 5, 1), None, [1, 1], [4, 0], [2, 1], False, [0, 0], 1), {}),
            ((t(1, 4, S, 3), t(4, 4, 1, 1), t(4), [1, 1], [0, 0], [1, 1], False, [0, 0], 1), {}),
            ((t(1, 4, S, 3), t(4, 1, 3, 3), t(4), [1, 1], [1, 1], [1, 1], False, [0, 0], 4), {}),
            ((t(2, 3, S), t(2, 3, 3), t(2), [1], [1], [1], False, [0], 1), {}),
            ((t(1, 2, S, 3, 4), t(2, 2, 3, 3, 3), None, [1, 1, 1], [1, 1, 1], [1, 1, 1], False,
              [0, 0, 0], 1), {}),
            # not "same" along the rows, or strided: gathered
            ((t(1, 2, S, 4), t(2, 2, 3, 3), None, [1, 1], [0, 1], [1, 1], False, [0, 0], 1), {}),
            ((t(1, 2, S, 4), t(2, 2, 3, 3), None, [2, 1], [1, 1], [1, 1], False, [0, 0], 1), {}),
        ],
        aten.group_norm.default: [((t(S, 4, 3), 2, t(4), t(4), 1e-5), {})],
        aten.sum.dim_IntList: [((x, [2]), {}), ((x, [1], True), {}), ((x, []), {})],
        aten.mean.dim: [((x, [-1], True), {}), ((x, [0]), {})],
        aten.amax.default: [((x, [2]), {}), ((x,), {})],
        aten.amin.default: [((x, [0, 2]), {})],
        aten.any.dims: [((t(2, S, 4, dtype=torch.bool), [2]), {})],
        aten.any.dim: [((t(2, S, 4, dtype=torch.bool), 0), {})],
        aten.all.dim: [((t(2, S, 4, dtype=torch.bool), 2, True), {})],
        aten.prod.dim_int: [((x, 2), {})],
        aten.logsumexp.default: [((x, [2]), {})],
        aten.argmax.default: [((x, 2), {}), ((x,), {})],
        aten.argmin.default: [((x, 0, True), {})],
        aten.max.dim: [((x, 2), {})],
        aten.min.dim: [((x, 0, True), {})],
        aten.var.correction: [((x, [2]), {"correction": 1})],
        aten.std.correction: [((x, [0]), {"correction": 0, "keepdim": True})],
        aten.var_mean.correction: [((x, [2]), {"correction": 1})],
        aten.linalg_vector_norm.default: [((x, 2, [2]), {})],
        aten._softmax.default: [((x, -1, False), {}), ((x, 1, False), {})],
        aten._log_softmax.default: [((x, 2, False), {})],
        aten._safe_softmax.default: [((x, -1), {})],
        aten.cumsum.default: [((x, 2), {}), ((x, 1), {})],
        aten.cumprod.default: [((x, 0), {})],
        aten.logcumsumexp.default: [((x, 2), {})],
        aten.sort.default: [((x, 2), {}), ((x,), {})],
        aten.argsort.default: [((x, 0), {})],
        aten.topk.default: [((x, 2, 2), {})],
        aten.scaled_dot_product_attention.default: [
            ((b.transpose(1, 2), t(2, 3, S, 4, seed=1), t(2, 3, S, 4, seed=2)), {}),
            ((b.transpose(1, 2), t(2, 3, S, 4, seed=1), t(2, 3, S, 4, seed=2), mask), {}),
            ((b.transpose(1, 2), t(2, 3, 5, 4, seed=1), t(2, 3, 5, 4, seed=2)), {}),  # cross
            ((b.transpose(1, 2), t(2, 3, S, 4, seed=1), t(2, 3, S, 4, seed=2)),
             {"is_causal": True}),
            ((b.transpose(1, 2), t(2, 1, S, 4, seed=1), t(2, 1, S, 4, seed=2)),
             {"enable_gqa": True, "scale": 0.3}),
            ((t(S, 2, 3, 4), t(S, 2, 3, 4, seed=1), t(S, 2, 3, 4, seed=2),
              t(S, 1, 3, 3) > 0), {}),  # tokens folded into the batch
        ],
        aten._assert_tensor_metadata.default: [],  # returns nothing: test_assert_metadata
    }


def pointwise_samples() -> list[tuple[Any, tuple, dict]]:
    x, y = t(2, S, 4), t(2, S, 4, seed=3)
    return [
        (aten.add.Tensor, (x, y), {}), (aten.add.Tensor, (x, t(S, 4)), {}),
        (aten.mul.Tensor, (x, t(2, 1, 4)), {}), (aten.sub.Tensor, (t(S, 1), t(1, 5)), {}),
        (aten.div.Tensor, (x, 2.0), {}), (aten.where.self, (x > 0, x, y), {}),
        (aten.masked_fill.Scalar, (x, t(2, S, 1, dtype=torch.bool), -1.0), {}),
        (aten.gelu.default, (x,), {}), (aten.silu.default, (x,), {}),
        (aten._to_copy.default, (x,), {"dtype": torch.float16}),
        (aten.clone.default, (x,), {}), (aten.copy.default, (x, y), {}),
        (aten.copy.default, (x, t(S, 1)), {}), (aten.fill.Scalar, (x, 2.0), {}),
        (aten.pow.Tensor_Scalar, (x, 2), {}), (aten.rsqrt.default, (x.abs() + 1,), {}),
        (aten.exp.default, (x,), {}), (aten.eq.Tensor, (x, y), {}),
        (aten.bitwise_and.Tensor, (x > 0, y > 0), {}), (aten.logical_not.default, (x > 0,), {}),
        (aten.clamp.default, (x, -0.5, 0.5), {}), (aten.floor_divide.default, (x, y), {}),
        (aten.zeros_like.default, (x,), {}), (aten.full_like.default, (x, 3.0), {}),
        (aten.ones_like.default, (x,), {}),
        (aten.empty_like.default, (x,), {}), (aten.alias.default, (x,), {}),
        (aten.detach.default, (x,), {}), (aten.rsub.Scalar, (x, 1.0), {}),
        (aten.lift_fresh_copy.default, (x,), {}), (aten.fill.Tensor, (x, torch.tensor(1.5)), {}),
    ]


@pytest.mark.parametrize("op", sorted(samples(), key=str), ids=str)
def test_rule(op):
    cases = samples()[op]
    if op == aten._assert_tensor_metadata.default:
        pytest.skip("checked in test_assert_metadata")
    proved = sum(check(op, args, kwargs) for args, kwargs in cases)
    if op in _REPLICATED_OUT:  # a new tensor of a global size: replicated by design
        return
    assert proved > 0, f"{op}: no sample exercised a sharded output"


_REPLICATED_OUT = {aten.new_zeros.default, aten.new_ones.default, aten.new_full.default,
                   aten.new_empty.default, aten.new_empty_strided.default}


@pytest.mark.parametrize("case", pointwise_samples(), ids=lambda c: str(c[0]))
def test_pointwise(case):
    op, args, kwargs = case
    assert check(op, args, kwargs) > 0


def test_every_registered_rule_has_samples():
    table = samples()
    pointwise = {op for op, _, _ in pointwise_samples()}
    missing = [op for op in rules.registered_ops() if op not in table and op not in pointwise]
    assert not missing, f"rules without a differential test: {missing}"


def test_a_wrong_rule_is_caught(monkeypatch):
    """The harness itself can fail: claim cumsum along the tokens is token-wise."""
    from cpfx.sharding.rules.pointwise import pointwise

    monkeypatch.setitem(rules._RULES, aten.cumsum.default, pointwise)
    with pytest.raises(AssertionError):
        check(aten.cumsum.default, (t(2, S, 4), 1))


def test_reductions_over_tokens_are_partial_or_gathered():
    """A per-tensor amax (a dynamic quantization scale), a mean-pool and a sum over the tokens
    are computed per shard as partial values (an all-reduce completes them); a scan, a variance
    or a logsumexp over the tokens must not be, and is gathered."""
    x = t(2, S, 4)
    partial = [(aten.amax.default, (x,), "max"), (aten.mean.dim, (x, [1]), "sum"),
               (aten.sum.dim_IntList, (x, []), "sum"), (aten.amin.default, (x, [1]), "min")]
    for op, args, kind in partial:
        call = _make_call(op, args, {}, {0: Shard(1, Layout.even(S, WORLD))}, 0)
        dec = rules.decide(call)
        assert dec.out == Partial(kind), op
    for op, args in [(aten.cumsum.default, (x, 1)), (aten.logsumexp.default, (x, [1]))]:
        call = _make_call(op, args, {}, {0: Shard(1, Layout.even(S, WORLD))}, 0)
        dec = rules.decide(call)
        assert dec.needs == (REPLICATE,) and dec.out == REPLICATE, op


def _contiguous_layouts(n: int) -> list[Layout]:
    """Rows in rank order with empty ranks: first, middle, last, all on one rank."""
    a = n // 2
    return [Layout.make(n, [[], [(0, a)], [(a, n - a)]]),
            Layout.make(n, [[(0, a)], [], [(a, n - a)]]),
            Layout.make(n, [[(0, 1)], [(1, n - 1)], []]),
            Layout.make(n, [[], [(0, n)], []])]


def test_convolution_halos_with_empty_and_single_row_shards(monkeypatch):
    """The halo convolutions of the samples again, over layouts whose shards are empty or one row
    (the exchange then skips a rank, or reaches past the neighbour)."""
    monkeypatch.setitem(globals(), "layouts", _contiguous_layouts)
    proved = sum(check(aten.convolution.default, args, kw)
                 for args, kw in samples()[aten.convolution.default])
    assert proved > 0


def test_a_halo_too_short_is_caught(monkeypatch):
    """The harness itself can fail: a halo one row short of the kernel's reach."""
    from cpfx import halo

    monkeypatch.setattr(halo.Halo, "span", lambda self, r: _short_span(self, r))
    with pytest.raises(AssertionError):
        check(aten.convolution.default,
              (t(2, 2, S, 5), t(3, 2, 3, 3), t(3), [1, 1], [1, 1], [1, 1], False, [0, 0], 1))


def _short_span(h, r):
    pieces = h.layout.pieces(r)
    s = pieces[0][0] if pieces else 0
    e = s + sum(n for _, n in pieces)
    return s, e, max(0, s - h.pad + 1), min(h.layout.size, e + h.pad - 1)


def test_contraction_over_tokens_is_a_partial_sum():
    """Linear attention's K^T V: both operands sharded along the contracted tokens alike."""
    lay = Layout.even(S, WORLD)
    call = _make_call(aten.bmm.default, (t(2, 3, S), t(2, S, 4)), {},
                      {0: Shard(2, lay), 1: Shard(1, lay)}, 0)
    assert rules.decide(call).out == Partial("sum")
    other = Layout.even(S, WORLD).reversed()
    call = _make_call(aten.bmm.default, (t(2, 3, S), t(2, S, 4)), {},
                      {0: Shard(2, lay), 1: Shard(1, other)}, 0)
    assert not isinstance(rules.decide(call).out, Partial)  # different layouts: not one sum


def test_unknown_op_is_gathered():
    x = t(2, S, 4)
    call = _make_call(aten.nonzero.default, (x,), {}, {0: Shard(1, Layout.even(S, WORLD))}, 0)
    dec = rules.decide(call)
    assert dec.needs == (REPLICATE,) and dec.rule == "gather: no rule"


def test_random_ops_are_not_pointwise():
    from cpfx.sharding.rules.pointwise import is_pointwise

    assert not is_pointwise(aten.bernoulli.p) and not is_pointwise(aten.rand_like.default)
    assert not is_pointwise(aten.native_dropout.default)


def test_attention_dropout_refused():
    from cpfx.errors import UnsupportedPatternError

    q = t(1, 2, S, 4)
    call = _make_call(aten.scaled_dot_product_attention.default, (q, q, q, None, 0.1), {},
                      {0: Shard(2, Layout.even(S, WORLD))}, 0)
    with pytest.raises(UnsupportedPatternError, match="dropout"):
        rules.decide(call)


def test_assert_metadata():
    x = t(2, S, 4)
    call = _make_call(aten._assert_tensor_metadata.default, (x,),
                      {"size": [2, S, 4], "stride": [S * 4, 4, 1], "dtype": torch.float32},
                      {0: Shard(1, Layout.even(S, WORLD))}, 0)
    dec = rules.decide(call)
    assert "size" not in dec.kwargs and dec.kwargs["dtype"] == torch.float32
