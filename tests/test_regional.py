"""`ParallelConfig(regional=True)`: one graph per repeated block class, exact on real ranks."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import cpfx
from cpfx.testing.parity import first_output, fresh, make_mesh
from cpfx.testing.tiny import build

CASES = {
    # model, builder kwargs, block classes
    "flux": ({"layers": 3, "single": 3}, 2),
    "qwen": ({"layers": 3}, 1),
    "wan": ({"layers": 3}, 1),
}


@pytest.mark.ranks
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("model", sorted(CASES))
def test_regional_parity_one_graph_per_block_class(pools, model, world):
    kwargs, classes = CASES[model]
    for r, res in enumerate(pools(world).run(regional, model=model, model_kwargs=kwargs)):
        assert res["max_abs"] <= 1e-5, f"rank {r}: {res}"
        # every instance of a class reuses its graphs: one for the token shards it is handed,
        # and the first class one for whole inputs (the first block, first call only)
        assert res["graphs"] == classes + 1, res["reasons"]
        assert res["runs"] == 3 * res["blocks"], res  # three calls, every block in a cpfx graph
        assert res["parallel"] >= res["blocks"] and res["outside"] == 0, res
        # The last call hands shards from block to block: only what the epilogue reads (the
        # image stream; Flux's text stream is dropped) is gathered, once.
        assert res["last_call"].get("passed_in", 0) >= res["blocks"] - 1, res
        assert res["last_call"].get("gathered", 0) == 1, res


@pytest.mark.graph
def test_regional_needs_repeated_blocks():
    import torch

    from cpfx.explain import fake_world

    class Plain(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.scaled_dot_product_attention(x, x, x)

    with fake_world(2):
        with pytest.raises(cpfx.ConfigError, match="_repeated_blocks"):
            cpfx.parallelize(Plain(), None, cpfx.ParallelConfig(regional=True))


@pytest.mark.graph
def test_blocks_inferred_without_repeated_blocks():
    """CogVideoX lists no `_repeated_blocks`: its ModuleList of attention blocks stands in (what
    Flux lists is found the same way)."""
    from cpfx.api import _inferred_blocks

    m, _ = build("cogvideox")
    assert not getattr(m, "_repeated_blocks", None)
    assert _inferred_blocks(m) == ("CogVideoXBlock",)
    flux, _ = build("flux")
    assert _inferred_blocks(flux) == tuple(flux._repeated_blocks)


# --- the task every rank of the pool runs -----------------------------------------------------


def regional(
    model: str, model_kwargs: dict[str, Any] | None = None, calls: int = 3
) -> dict[str, Any]:
    """`ParallelConfig(regional=True)`: parity with the single process, the graphs compiled (one
    per block class expected) and what the observed call's attentions ran as."""
    import cpfx

    fresh()
    m, kw = build(model, **(model_kwargs or {}))
    with torch.no_grad():
        ref = first_output(m(**kw))[0].float()
    mesh = make_mesh()
    cpfx.parallelize(m, mesh, cpfx.ParallelConfig(regional=True))
    diffs = []
    with torch.no_grad():
        for _ in range(calls):
            cpfx.counters["resident"].clear()
            diffs.append((first_output(m(**kw))[0].float() - ref).abs().max().item())
    rt = m._cpfx
    report = rt.reports[-1]  # observed again after the shards-in recompile
    return {
        "max_abs": max(diffs),
        "graphs": len(rt.graphs),
        "blocks": sum(1 for b in m.modules() if type(b).__name__ in m._repeated_blocks),
        "parallel": report.parallel,
        "outside": report.outside_total,
        "runs": sum(g.runs for g in rt.graphs),
        "reasons": rt.recompile_reasons,
        "last_call": dict(cpfx.counters["resident"]),
    }


class _Blk(torch.nn.Module):
    def __init__(self, dim: int, graph_break: bool) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)
        self.graph_break = graph_break

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, 2, d // 2).permute(2, 0, 3, 1, 4)
        if self.graph_break:
            torch._dynamo.graph_break()
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return x + self.out(o.transpose(1, 2).reshape(b, s, d)) * scale


class _Stack(torch.nn.Module):
    _repeated_blocks = ("_Blk",)

    def __init__(self, graph_break: bool = False, n: int = 4, dim: int = 16) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(8, dim)
        self.blocks = torch.nn.ModuleList(_Blk(dim, graph_break) for _ in range(n))
        self.proj = torch.nn.Linear(dim, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        scale = torch.ones(1, 1, h.shape[-1])
        for blk in self.blocks:
            h = blk(h, scale)
        return self.proj(h)


def stack_between_blocks(graph_break: bool, tokens: int) -> dict[str, Any]:
    """A hook mixing tokens on one block only (its siblings share the graph: Dynamo must guard
    the hook) and a graph break inside the block: results stay exact, and no token shard reaches
    the caller."""
    import cpfx

    fresh()
    torch.manual_seed(0)
    m = _Stack(graph_break).eval()

    def mix(mod: torch.nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        return out + out.mean(1, keepdim=True).roll(1, -1)  # reads every token

    m.blocks[1].register_forward_hook(mix)
    x = torch.randn(2, tokens, 8)
    with torch.no_grad():
        ref = m(x)
        alone = m.blocks[0](m.inp(x), torch.ones(1, 1, 16))
        cpfx.parallelize(m, make_mesh(), cpfx.ParallelConfig(regional=True))
        diffs, kinds = [], set()
        # With the graph break, shards reach a block only from the second call on (the first
        # run of a graph that is not the whole block gathers its outputs).
        for _ in range(5):
            cpfx.counters["resident"].clear()
            out = m(x)
            kinds.add(type(out).__name__)
            diffs.append((out - ref).abs().max().item())
        last_call = dict(cpfx.counters["resident"])
        own = m.blocks[0](m.inp(x), torch.ones(1, 1, 16))  # a block called on its own
    return {
        "max_abs": max(diffs),
        "kinds": sorted(kinds),
        "alone": (own - alone).abs().max().item(),
        "alone_kind": type(own).__name__,
        "last_call": last_call,
    }


@pytest.mark.ranks
@pytest.mark.parametrize("graph_break", [False, True])
def test_regional_shards_between_blocks_stay_exact(pools, graph_break):
    for res in pools(3).run(stack_between_blocks, graph_break=graph_break, tokens=17):
        assert res["max_abs"] <= 1e-5 and res["alone"] <= 1e-5, res
        assert res["kinds"] == ["Tensor"] and res["alone_kind"] == "Tensor", res
        if graph_break:  # the block's graphs gather their outputs: nothing is handed on
            assert res["last_call"].get("passed_in", 0) == 0, res
        else:  # the hook runs in block 1's graph: block 0 gets its part of the input, shards go
            # 0 -> 1 -> 2 -> 3; the epilogue gathers
            assert res["last_call"] == {"sharded_in": 1, "passed_in": 4, "gathered": 1}, res


class _Joint(torch.nn.Module):
    """Joint attention over (context, x); only every other block updates the context stream, the
    others hand it back as they got it (a shard in, the same shard out)."""

    def __init__(self, dim: int, touch_ctx: bool) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)
        self.touch_ctx = touch_ctx

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        j = torch.cat([ctx, x], 1)
        b, s, d = j.shape
        q, k, v = self.qkv(j).view(b, s, 3, 2, d // 2).permute(2, 0, 3, 1, 4)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        o = self.out(o.transpose(1, 2).reshape(b, s, d))
        x = x + o[:, ctx.shape[1] :]
        if self.touch_ctx:
            ctx = ctx + o[:, : ctx.shape[1]]
        return x, ctx


class _JointStack(torch.nn.Module):
    _repeated_blocks = ("_Joint",)

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(_Joint(16, i % 2 == 0) for i in range(4))

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for blk in self.blocks:
            x, ctx = blk(x, ctx)
        return x, ctx  # straight from the last block: the model must not return shards


def joint_passthrough() -> dict[str, Any]:
    import cpfx

    fresh()
    torch.manual_seed(0)
    m = _JointStack().eval()
    x, ctx = torch.randn(2, 17, 16), torch.randn(2, 7, 16)
    with torch.no_grad():
        ref = m(x, ctx)
        cpfx.parallelize(m, make_mesh(), cpfx.ParallelConfig(regional=True))
        diffs, kinds = [], set()
        for _ in range(4):
            cpfx.counters["resident"].clear()
            out = m(x, ctx)
            kinds |= {type(t).__name__ for t in out}
            diffs.append(max((a - b).abs().max().item() for a, b in zip(out, ref)))
    return {"max_abs": max(diffs), "kinds": sorted(kinds), "last": dict(cpfx.counters["resident"])}


@pytest.mark.ranks
def test_regional_block_handing_a_shard_back_unchanged(pools):
    for res in pools(3).run(joint_passthrough):
        assert res["max_abs"] <= 1e-5 and res["kinds"] == ["Tensor"], res
        # x and ctx into every block: block 0 gets its part of the inputs
        assert res["last"] == {"sharded_in": 2, "passed_in": 8, "gathered": 2}, res


def regional_sizes(sizes: list[int]) -> dict[str, Any]:
    """One regional model at several resolutions, each twice."""
    import cpfx

    fresh()
    m, _ = build("flux", layers=2, single=2)
    cases = []
    with torch.no_grad():
        for n in sizes:
            kw = build("flux", img=n, layers=2, single=2)[1]
            cases.append((kw, m(**kw)[0]))
        cpfx.parallelize(m, make_mesh(), cpfx.ParallelConfig(regional=True))
        diffs = [(m(**kw)[0] - ref).abs().max().item() for kw, ref in cases + cases]
    return {"max_abs": max(diffs), "graphs": len(m._cpfx.graphs)}


@pytest.mark.ranks
def test_regional_many_resolutions_within_the_recompile_limit(pools):
    """Each resolution compiles a graph per block class (whole inputs only on the first call: the
    first block is then handed its part): six resolutions need more graphs than Dynamo's
    recompile limit (8 per function), within the regional limit (4x)."""
    for res in pools(2).run(regional_sizes, sizes=[16, 24, 32, 40, 48, 64]):
        assert res["max_abs"] <= 1e-5 and res["graphs"] == 1 + 6 * 2, res


class _Writes(torch.nn.Module):
    """Adds its attention output into its input in place (`x += ...`), returns a new value."""

    def __init__(self, dim: int, graph_break: bool) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)
        self.graph_break = graph_break

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, 2, d // 2).permute(2, 0, 3, 1, 4)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        x[:, 1:] += self.out(o.transpose(1, 2).reshape(b, s, d))[:, 1:]
        if self.graph_break:
            torch._dynamo.graph_break()
        return x * 0.5


class _WritesStack(torch.nn.Module):
    _repeated_blocks = ("_Writes",)

    def __init__(self, graph_break: bool) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(8, 16)
        self.blocks = torch.nn.ModuleList(
            _Writes(16, graph_break and i % 2 == 1) for i in range(4)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        prev = [h]
        for blk in self.blocks:
            h = blk(h)  # a token shard from the second block on
            prev.append(h)
        # reads each block's input after the block wrote to it
        return h + sum(p.mean(1, keepdim=True) for p in prev)


def _stack_against_single(make: Any, tokens: int = 17) -> dict[str, Any]:
    """A tiny stack of blocks (`make()`), regional on the pool's ranks, three calls against the
    single process; the resident counters of the last call."""
    import cpfx

    fresh()
    torch.manual_seed(0)
    m = make().eval()
    x = torch.randn(2, tokens, 8)
    with torch.no_grad():
        ref = m(x)
        cpfx.parallelize(m, make_mesh(), cpfx.ParallelConfig(regional=True))
        diffs = []
        for _ in range(3):
            cpfx.counters["resident"].clear()
            diffs.append((m(x) - ref).abs().max().item())
    return {"diffs": diffs, "last": dict(cpfx.counters["resident"])}


def writes_to_input(tokens: int, graph_break: bool) -> dict[str, Any]:
    return _stack_against_single(lambda: _WritesStack(graph_break), tokens)


@pytest.mark.ranks
@pytest.mark.parametrize("graph_break", [False, True])
def test_regional_block_writing_to_its_input_in_place(pools, graph_break):
    """A block's in-place write to a token shard it was handed reaches the caller's tensor (the
    caller reads it after the block), as the write to a whole input does; also when the block's
    graph breaks after the write (every other block: its input is a shard, its output whole)."""
    for res in pools(2).run(writes_to_input, tokens=17, graph_break=graph_break):
        assert max(res["diffs"]) <= 1e-5, res
        passed = res["last"].get("passed_in", 0)
        if not graph_break:  # the shards did stay resident (block 0 gets its part of the input)
            assert passed == 4 and res["last"]["sharded_in"] == 1, res
        assert passed >= 1 and res["last"].get("written_back", 0) == passed, res


class _EagerWrites(torch.nn.Module):
    """Eager code between the blocks writes to a block's output in place: through the tensor
    (`mul_`) and through a view of it taken earlier (`v += 1`)."""

    _repeated_blocks = ("_Blk",)

    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(8, 16)
        self.blocks = torch.nn.ModuleList(_Blk(16, False) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        scale = torch.ones(1, 1, 16)
        for i, blk in enumerate(self.blocks):
            h = blk(h, scale)
            if i == 0:
                h.mul_(0.5)
            if i == 1:
                v = h[:, :3]
                v += 1.0
        return h


def eager_writes_between_blocks() -> dict[str, Any]:
    return _stack_against_single(_EagerWrites)


@pytest.mark.ranks
def test_regional_eager_writes_to_a_shard_between_blocks(pools):
    """A write to a block's output in the eager code between blocks reaches the next block."""
    for res in pools(2).run(eager_writes_between_blocks):
        assert max(res["diffs"]) <= 1e-5, res
        assert res["last"]["written_eagerly"] == 2 and res["last"]["passed_in"] == 4, res


class _Aliased(torch.nn.Module):
    """Handed one tensor twice: writes through the first, attends over the second."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(dim, 3 * dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x[:, 1:] += 1.0
        b, s, d = y.shape
        q, k, v = self.qkv(y).view(b, s, 3, 2, d // 2).permute(2, 0, 3, 1, 4)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return o.transpose(1, 2).reshape(b, s, d) + y


class _AliasedStack(torch.nn.Module):
    _repeated_blocks = ("_Aliased",)

    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(8, 16)
        self.blocks = torch.nn.ModuleList(_Aliased(16) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for blk in self.blocks:
            h = blk(h, h)
        return h


def aliased_arguments() -> dict[str, Any]:
    return _stack_against_single(_AliasedStack)


@pytest.mark.ranks
def test_regional_block_handed_one_tensor_twice(pools):
    """A write through one argument shows in the other, as the two are one tensor."""
    for res in pools(2).run(aliased_arguments):
        assert max(res["diffs"]) <= 1e-5, res


@pytest.mark.graph
def test_carrier_holds_a_long_layout_without_overflow():
    """A shard's global size and layout travel as the sizes of an empty tensor (symbolic under
    `dynamic=True`): a layout of many pieces of large values must not overflow its numel, and
    no value may be 0 or 1 (Dynamo would specialize it)."""
    from cpfx import resident
    from cpfx.sharding.layout import Layout

    size = 300_003
    parts = [[(r * 1000 + k * 3000, 1000) for k in range(100)] for r in range(3)]
    lay = Layout.make(size, [p + ([(300_000, 3)] if r == 0 else []) for r, p in enumerate(parts)])
    shard = torch.zeros(1, lay.local_size(0), 4)
    t = resident.TokenShards(shard, 1, lay, "group")
    specs, shards, _, held = resident.block_args((t,), {})
    carrier = shards[1]
    assert specs == ((0, 1, "group"),) and held[0] is t and carrier.numel() == 0
    assert min(carrier.shape[1:]) >= 2
    values = [v - resident.CARRIER_OFFSET for v in carrier.shape[1:]]
    assert resident.unflatten_layout(values[0], values[1:]) == lay


def regional_on_mesh(shape: tuple[int, ...], names: tuple[str, ...], dynamic: bool) -> dict[str, Any]:
    """Regional Flux on a ring or ring x Ulysses mesh, two resolutions (odd tokens), each twice."""
    import cpfx

    fresh()
    m, _ = build("flux", layers=2, single=2)
    cases = []
    with torch.no_grad():
        for img in (37, 64):
            kw = build("flux", img=img, layers=2, single=2)[1]
            cases.append((kw, first_output(m(**kw))[0]))
        cfg = cpfx.ParallelConfig(regional=True, dynamic=dynamic)
        cpfx.parallelize(m, make_mesh(shape, names), cfg)
        cpfx.counters["resident"].clear()
        diffs = [(first_output(m(**kw))[0] - ref).abs().max().item() for kw, ref in cases + cases]
    return {"diffs": diffs, "resident": dict(cpfx.counters["resident"])}


@pytest.mark.ranks
@pytest.mark.parametrize(
    "shape,names,dynamic",
    [((2,), ("ring",), True), ((2, 2), ("ring", "ulysses"), False)],
    ids=["ring-dynamic", "usp-static"],
)
def test_regional_shards_on_ring_meshes(pools, shape, names, dynamic):
    """Shards handed on, and first blocks handed their part, where attention is ring or hybrid."""
    world = shape[0] * (shape[1] if len(shape) > 1 else 1)
    for res in pools(world).run(regional_on_mesh, shape=shape, names=names, dynamic=dynamic):
        assert max(res["diffs"]) <= 1e-5, res
        assert res["resident"]["sharded_in"] >= 4 and res["resident"]["passed_in"] > 0, res
