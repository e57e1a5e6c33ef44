"""Context-parallel attention: the replacement for one sharded SDPA call.

`cp_attention` is an ordinary function of (q, k, v, mask) plus a frozen `AttnSpec`; the lowering
pass traces it into the graph in place of each `cpfx::sharded_attention` placeholder, and tests
run it eagerly. Queries and keys/values may be sharded with different layouts (`AttnSite`).
Strategy follows the mesh:

    Ulysses (U > 1):  [B, H, S/N, D] -all-to-all-> [B, H/U, S/R, D]  (sequence gathered in the group)
    ring    (R > 1):  K/V blocks of the R ring peers visited, outputs merged by log-sum-exp (fp32)
    hybrid:           Ulysses inside the group, ring across groups, all-to-all back.

Payloads cross the all-to-alls through a codec: plain, or FP8 (e4m3 bytes plus an inline fp32
scale per (token, head) row, `cpfx.kernels.fp8`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from cpfx import comm
from cpfx.debug import counters
from cpfx.graph_utils import tag
from cpfx.mesh import MeshInfo
from cpfx.sharding.layout import Layout, Range
from cpfx.sharding.placement import take_pieces

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class AttnSite:
    """One attention over a sharded sequence, as the shard plan found it."""

    q_layout: Layout
    kv_layout: Layout
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    value_dim: int
    scale: float | None
    enable_gqa: bool
    causal: bool
    dtype: torch.dtype
    mask_shape: tuple[int, ...] | None
    """Global mask shape, left-padded with 1s to 4-D ([B|1, H|1, Sq|1, Sk|1]); None: no mask."""
    mask_ndim: int
    mask_is_bool: bool
    where: str


@dataclasses.dataclass(frozen=True)
class AttnSpec:
    """Everything static one rank's sharded attention needs."""

    site: AttnSite
    mesh: MeshInfo
    ring_rotate: Literal["allgather", "p2p"] = "p2p"
    head_padding: Literal["pad", "uneven"] = "pad"
    fp8_roles: frozenset[str] = frozenset()
    """Roles ("q", "k", "v", "o") whose all-to-all payload travels as FP8."""
    differentiable: bool = False
    """The graph will be differentiated: each ring block's attention and log-sum-exp are computed
    with ops that have derivatives (the fused kernels give none for the log-sum-exp)."""
    one_qkv_transfer: bool = False
    """Send Q, K and V in one all-to-all (one call, one wait) where they share the token layout,
    the head count and a plain payload; else one all-to-all each."""

    def group_ranks(self, ring_index: int) -> list[int]:
        """CP ranks whose tokens form ring block `ring_index` after the Ulysses all-to-all."""
        U = self.mesh.ulysses
        return [ring_index * U + u for u in range(U)]

    def q_pieces(self, ring_index: int) -> list[Range]:
        return self.site.q_layout.ranks_pieces(self.group_ranks(ring_index))

    def kv_pieces(self, ring_index: int) -> list[Range]:
        return self.site.kv_layout.ranks_pieces(self.group_ranks(ring_index))

    def seq_sizes(self, layout: Layout) -> tuple[int, list[int]]:
        """(this rank's token count, the counts of its Ulysses group in rank order)."""
        group = self.group_ranks(self.mesh.ring_index)
        return layout.local_size(self.mesh.cp_rank), [layout.local_size(r) for r in group]

    def head_sizes(self, heads: int) -> list[int]:
        """Heads per Ulysses rank: uneven groups (padding-free) or padded equal groups."""
        U = self.mesh.ulysses
        if self.head_padding == "uneven" and heads % U:
            base, rem = divmod(heads, U)
            return [base + (j < rem) for j in range(U)]
        return [-(-heads // U)] * U

    def head_range(self, heads: int) -> tuple[int, int]:
        sizes = self.head_sizes(heads)
        return sum(sizes[: self.mesh.ulysses_index]), sizes[self.mesh.ulysses_index]

    @property
    def local_heads(self) -> int:
        """Query heads this rank attends over after the Ulysses all-to-all."""
        return self.head_sizes(self.site.heads)[self.mesh.ulysses_index]


# --- payload codecs ----------------------------------------------------------------------------


class Plain:
    """The payload as it is: [B, H, S, D] <-> rows [G, S, B, H/G, D]. Shapes are passed in:
    the tensors may be FX proxies while the lowering traces these functions."""

    @staticmethod
    def width(d: int) -> int:
        return d

    @staticmethod
    def encode(x: Tensor, groups: int, shape: tuple[int, int, int, int]) -> Tensor:
        B, H, S, D = shape
        return x.reshape(B, groups, H // groups, S, D).permute(1, 3, 0, 2, 4)

    @staticmethod
    def decode(rows: Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
        G, S, B, h, D = shape
        return rows.permute(2, 0, 3, 1, 4).reshape(B, G * h, S, D)


class Fp8:
    """e4m3 bytes + the fp32 scale of each (token, head) row, inline: uint8 rows of D + 4."""

    @staticmethod
    def width(d: int) -> int:
        return d + 4

    @staticmethod
    def encode(x: Tensor, groups: int, shape: tuple[int, int, int, int]) -> Tensor:
        return torch.ops.cpfx.fp8_quantize(x, groups)

    @staticmethod
    def decode(rows: Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
        return torch.ops.cpfx.fp8_dequantize(rows, dtype)


def _codec(spec: AttnSpec, role: str) -> type[Plain] | type[Fp8]:
    return Fp8 if role in spec.fp8_roles else Plain


# --- Ulysses all-to-alls -----------------------------------------------------------------------


def _dim(spec: AttnSpec, role: str) -> int:
    """The last dim of a role's payload (static: tensors may be FX proxies here)."""
    return spec.site.head_dim if role in ("q", "k") else spec.site.value_dim


def seq_to_heads(x: Tensor, spec: AttnSpec, heads: int, role: str, layout: Layout) -> Tensor:
    """[B, H, S_loc, D] -> [B, h_me, S_blk, D]: scatter heads, gather this group's tokens."""
    U, B, D = spec.mesh.ulysses, spec.site.batch, _dim(spec, role)
    codec = _codec(spec, role)
    W = codec.width(D)
    s_loc, sizes = spec.seq_sizes(layout)
    hs = spec.head_sizes(heads)
    me = hs[spec.mesh.ulysses_index]
    if len(set(hs)) == 1:  # equal groups, zero heads padded in if needed (dropped afterwards)
        hp = hs[0] * U
        if hp != heads:
            x = F.pad(x, (0, 0, 0, 0, 0, hp - heads))
        rows = codec.encode(x, U, (B, hp, s_loc, D)).reshape(U * s_loc, B, hs[0], W)
        y = comm.all_to_all(rows, sizes, [s_loc] * U, spec.mesh.ulysses_group, role)
    else:  # uneven head groups, padding-free: a flat buffer with per-peer element counts
        rows = codec.encode(x, 1, (B, heads, s_loc, D)).reshape(s_loc, B, heads, W)
        offs = [sum(hs[:j]) for j in range(U)]
        buf = torch.cat([rows.narrow(2, offs[j], hs[j]).reshape(-1) for j in range(U)])
        y = comm.all_to_all(
            buf,
            [n * B * me * W for n in sizes],
            [s_loc * B * h * W for h in hs],
            spec.mesh.ulysses_group,
            role,
        )  # flat: peer j's [S_j, B, h_me, W], in peer order
    blk = sum(sizes)
    return codec.decode(y.reshape(1, blk, B, me, W), spec.site.dtype, (1, blk, B, me, D))


def qkv_to_heads(
    q: Tensor, k: Tensor, v: Tensor, spec: AttnSpec, heads: int
) -> tuple[Tensor, Tensor, Tensor]:
    """`seq_to_heads` of Q, K and V in one all-to-all: rows [S_loc, B, h, D + D + Dv]."""
    site = spec.site
    U, B, D, Dv = spec.mesh.ulysses, site.batch, site.head_dim, site.value_dim
    s_loc, sizes = spec.seq_sizes(site.q_layout)
    h = spec.head_sizes(heads)[0]
    parts = []
    for x, d in ((q, D), (k, D), (v, Dv)):
        if h * U != heads:
            x = F.pad(x, (0, 0, 0, 0, 0, h * U - heads))
        parts.append(Plain.encode(x, U, (B, h * U, s_loc, d)))  # [U, S_loc, B, h, d] views
    W = 2 * D + Dv
    rows = torch.cat(parts, -1).reshape(U * s_loc, B, h, W)
    y = comm.all_to_all(rows, sizes, [s_loc] * U, spec.mesh.ulysses_group, "qkv")
    blk = sum(sizes)
    y = y.reshape(1, blk, B, h, W)
    q, k, v = (
        Plain.decode(y.narrow(-1, a, d), site.dtype, (1, blk, B, h, d))
        for a, d in ((0, D), (D, D), (2 * D, Dv))
    )
    return q, k, v


def _one_transfer(spec: AttnSpec, kv_heads: int) -> bool:
    site = spec.site
    return (
        spec.one_qkv_transfer
        and site.q_layout == site.kv_layout
        and kv_heads == site.heads
        and not ({"q", "k", "v"} & spec.fp8_roles)
        and len(set(spec.head_sizes(site.heads))) == 1
    )


def heads_to_seq(y: Tensor, spec: AttnSpec) -> Tensor:
    """[B, h_me, S_blk, D] -> [B, H, S_loc, D]: the inverse all-to-all, padded heads dropped."""
    U, B, H, D = spec.mesh.ulysses, spec.site.batch, spec.site.heads, _dim(spec, "o")
    codec = _codec(spec, "o")
    W = codec.width(D)
    s_loc, sizes = spec.seq_sizes(spec.site.q_layout)
    hs = spec.head_sizes(H)
    me = hs[spec.mesh.ulysses_index]
    blk = sum(sizes)
    rows = codec.encode(y, 1, (B, me, blk, D))  # [1, S_blk, B, h_me, W]
    if len(set(hs)) == 1:
        x = comm.all_to_all(
            rows.reshape(blk, B, me, W), [s_loc] * U, sizes, spec.mesh.ulysses_group, "o"
        )  # [U * S_loc, B, Hp/U, W]
        out = codec.decode(x.reshape(U, s_loc, B, me, W), spec.site.dtype, (U, s_loc, B, me, D))
        return out[:, :H] if me * U != H else out
    counts = [s_loc * B * h * W for h in hs]
    x = comm.all_to_all(
        rows.reshape(-1), counts, [n * B * me * W for n in sizes], spec.mesh.ulysses_group, "o"
    )  # flat: peer j's [S_loc, B, h_j, W], in peer order
    parts = [x.narrow(0, sum(counts[:j]), counts[j]).reshape(s_loc, B, hs[j], W) for j in range(U)]
    return codec.decode(
        torch.cat(parts, 2).reshape(1, s_loc, B, H, W), spec.site.dtype, (1, s_loc, B, H, D)
    )


# --- masks -----------------------------------------------------------------------------------


def _positions(like: Tensor, pieces: list[Range]) -> Tensor:
    return torch.ops.cpfx.positions(like, [s for s, _ in pieces], [n for _, n in pieces])


def local_mask(
    mask: Tensor | None, spec: AttnSpec, q_pieces: list[Range], k_pieces: list[Range], like: Tensor
) -> Tensor | None:
    """The part of the global [.., Sq, Sk] mask that these queries and this key block need (for
    causal attention, built from the global positions of both; `like` gives the device)."""
    site = spec.site
    if site.causal:
        return _positions(like, q_pieces)[:, None] >= _positions(like, k_pieces)[None, :]
    if mask is None:
        return None
    m = mask
    for _ in range(4 - site.mask_ndim):
        m = m.unsqueeze(0)
    shape = site.mask_shape
    assert shape is not None, site  # recorded with the mask
    if shape[1] > 1 and spec.mesh.ulysses > 1:  # per-head mask: keep this rank's head group
        start, n = spec.head_range(shape[1])
        if start + n > shape[1]:  # padded heads: their (discarded) rows may use any mask
            m = torch.cat([m, m.narrow(1, 0, 1).expand(-1, start + n - shape[1], -1, -1)], 1)
        m = m.narrow(1, start, n)
    if shape[2] > 1:
        m = take_pieces(m, 2, q_pieces)
    if shape[3] > 1:
        m = take_pieces(m, 3, k_pieces)
    return m


# --- local attention with log-sum-exp ------------------------------------------------------


def attention_lse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    spec: AttnSpec,
    shape: tuple[int, int, int, int],
) -> tuple[Tensor, Tensor]:
    """Attention of one K/V block: (out [B, h, Sq, Dv] in q's dtype, lse [B, h, Sq] fp32).

    `shape` is the static [B, h, Sq, Sk] of the score matrix."""
    site = spec.site
    is_bool = site.mask_is_bool or site.causal  # static: `mask` may be an FX proxy here
    if spec.differentiable:
        return _attention_lse_math(q, k, v, mask, is_bool, site.scale)
    bias = None
    if mask is not None:
        bias = (
            torch.where(mask, 0.0, float("-inf")).to(site.dtype) if is_bool else mask.to(site.dtype)
        )
    if spec.mesh.device_type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=bias, scale=site.scale
        )
    else:
        if bias is not None:
            bias = bias.expand(shape)
        out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, bias, True, 0.0, False, scale=site.scale
        )
        lse = lse[..., : shape[2]]
    lse = lse.float()
    if mask is not None:
        # A row with no allowed key in this block contributes nothing (the CPU kernel reports 0).
        allowed = (mask if is_bool else mask > float("-inf")).any(-1)
        lse = lse.masked_fill(allowed.logical_not(), float("-inf"))
    return out, lse


def _attention_lse_math(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_bool: bool, scale: float | None
) -> tuple[Tensor, Tensor]:
    """`attention_lse` from matmuls and `logsumexp`, in fp32: differentiable in (out, lse). A row
    with no allowed key gets lse -inf and out 0, with finite gradients."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    allowed = None
    if mask is not None:
        if is_bool:
            allowed = mask
            scores = scores.masked_fill(mask.logical_not(), float("-inf"))
        else:
            scores = scores + mask.float()
            allowed = mask > float("-inf")
        rows = allowed.any(-1, keepdim=True)
        scores = torch.where(rows, scores, torch.zeros_like(scores))  # no -inf-only rows
    lse = torch.logsumexp(scores, -1, keepdim=True)
    out = torch.matmul(torch.exp(scores - lse), v.float())
    lse = lse.squeeze(-1)
    if allowed is not None:
        rows = allowed.any(-1)
        out = out.masked_fill(rows.logical_not().unsqueeze(-1), 0.0)
        lse = lse.masked_fill(rows.logical_not(), float("-inf"))
    return out.to(q.dtype), lse


def merge_lse(
    acc: Tensor | None, acc_lse: Tensor | None, out: Tensor, lse: Tensor
) -> tuple[Tensor, Tensor]:
    """Fold one block's (out, lse) into the fp32 running (acc, acc_lse)."""
    out = out.float()
    if acc is None or acc_lse is None:
        return out, lse
    new = torch.logaddexp(acc_lse, lse)
    safe = torch.where(new == float("-inf"), torch.zeros_like(new), new)
    w_acc = torch.exp(acc_lse - safe).unsqueeze(-1)
    w_new = torch.exp(lse - safe).unsqueeze(-1)
    return acc * w_acc + out * w_new, new


# --- ring -------------------------------------------------------------------------------------


def _pack_kv(k: Tensor, v: Tensor, shape: tuple[int, int, int, int, int]) -> Tensor:
    """k [B, h, S, D], v [B, h, S, Dv] -> rows [S, B, h * (D + Dv)]: one transfer per block."""
    B, h, S, d, dv = shape
    rows = [k.permute(2, 0, 1, 3).reshape(S, B, h * d), v.permute(2, 0, 1, 3).reshape(S, B, h * dv)]
    return torch.cat(rows, -1)


def _unpack_kv(rows: Tensor, shape: tuple[int, int, int, int, int]) -> tuple[Tensor, Tensor]:
    S, B, h, d, dv = shape
    k = rows[..., : h * d].reshape(S, B, h, d).permute(1, 2, 0, 3)
    v = rows[..., h * d :].reshape(S, B, h, dv).permute(1, 2, 0, 3)
    return k, v


def ring_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, spec: AttnSpec, h: int
) -> Tensor:
    """Each rank's queries against every ring block of K/V; fp32 log-sum-exp merge.

    q: [B, h, S_q, D], k/v: [B, h, S_kv, D|Dv] (this rank's block after any Ulysses all-to-all)."""
    R, me, site = spec.mesh.ring, spec.mesh.ring_index, spec.site
    B, D = site.batch, site.head_dim
    q_pieces = spec.q_pieces(me)
    s_q = sum(n for _, n in q_pieces)
    sizes = [sum(n for _, n in spec.kv_pieces(j)) for j in range(R)]
    longest = max(sizes)
    rows = _pack_kv(k, v, (B, h, sizes[me], D, site.value_dim))
    rows = comm.pad_rows(rows, sizes[me], longest, 3)  # [S_max, B, h * (D + Dv)]
    width = h * (D + site.value_dim)

    def step(
        blk: Tensor, j: int, acc: Tensor | None, acc_lse: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None]:
        if sizes[j] == 0 or s_q == 0:
            return acc, acc_lse  # an empty block adds nothing (and empty kernels may crash)
        k_j, v_j = _unpack_kv(blk, (sizes[j], B, h, D, site.value_dim))
        m_j = local_mask(mask, spec, q_pieces, spec.kv_pieces(j), q)
        out, lse = attention_lse(q, k_j, v_j, m_j, spec, (B, h, s_q, sizes[j]))
        return merge_lse(acc, acc_lse, out, lse)

    acc = acc_lse = None
    if spec.ring_rotate == "allgather":
        full = comm.all_gather_rows(  # [R * S_max, B, h * (D + Dv)]
            rows,
            R,
            spec.mesh.ring_group,
            "kv",
            shape=(longest, B, width),
            device_type=spec.mesh.device_type,
        )
        for j in range(R):
            acc, acc_lse = step(full.narrow(0, j * longest, sizes[j]), j, acc, acc_lse)
    else:
        cur = rows
        for i in range(R):
            j = (me - i) % R  # the block that arrives at this step
            nxt = ring_shift(cur, spec) if i + 1 < R else None  # in flight during this step
            acc, acc_lse = step(cur.narrow(0, 0, sizes[j]), j, acc, acc_lse)
            if nxt is not None:
                cur = tag(comm.C10D.wait_tensor(nxt), cpfx_wait="ring")
    if acc is None:  # no query on this rank, or no key anywhere
        return q.new_zeros(B, h, s_q, site.value_dim)
    return acc.to(q.dtype)


def ring_shift(x: Tensor, spec: AttnSpec) -> Tensor:
    """Send `x` to the next ring rank, receive the previous rank's (async; wait with wait_tensor)."""
    m = spec.mesh
    nxt = m.ring_ranks[(m.ring_index + 1) % m.ring]
    prv = m.ring_ranks[(m.ring_index - 1) % m.ring]
    t = torch.ops.cpfx.ring_send_recv(x, nxt, prv, m.ring_group)
    return tag(t, cpfx_collective="ring_send_recv", cpfx_role="kv")


# --- the whole thing ---------------------------------------------------------------------------


def cp_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, spec: AttnSpec) -> Tensor:
    """Exact attention over the full (sharded) sequence; q/k/v are this rank's [B, H, S_loc, D]."""
    site, mesh = spec.site, spec.mesh
    gqa = site.enable_gqa and site.kv_heads != site.heads
    kv_heads = site.kv_heads
    if gqa and (mesh.ring > 1 or site.kv_heads % mesh.ulysses or site.heads % mesh.ulysses):
        # K/V head groups must line up with the query head groups of each rank.
        rep = site.heads // site.kv_heads  # expand K/V heads so they can be split like Q's
        k = k.repeat_interleave(rep, 1)
        v = v.repeat_interleave(rep, 1)
        gqa, kv_heads = False, site.heads
    if mesh.ulysses > 1 and _one_transfer(spec, kv_heads):
        counters["attention"]["qkv_one_transfer"] += 1
        q, k, v = qkv_to_heads(q, k, v, spec, site.heads)
    elif mesh.ulysses > 1:
        q = seq_to_heads(q, spec, site.heads, "q", site.q_layout)
        k = seq_to_heads(k, spec, kv_heads, "k", site.kv_layout)
        v = seq_to_heads(v, spec, kv_heads, "v", site.kv_layout)
    if mesh.ring > 1:
        out = ring_attention(q, k, v, mask, spec, spec.local_heads)
    else:
        q_pieces, k_pieces = spec.q_pieces(mesh.ring_index), spec.kv_pieces(mesh.ring_index)
        if not q_pieces or not k_pieces:  # nothing to attend here (empty kernels may crash)
            h = spec.local_heads if mesh.ulysses > 1 else site.heads
            s_q = sum(n for _, n in q_pieces)
            out = q.new_zeros(site.batch, h, s_q, site.value_dim)
        else:
            m = local_mask(mask, spec, q_pieces, k_pieces, q)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=m, scale=site.scale, enable_gqa=gqa
            )
    if mesh.ulysses > 1:
        out = heads_to_seq(out, spec)
    return out
