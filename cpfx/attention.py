"""Context-parallel attention: the replacement for one sharded SDPA call.

`cp_attention` is an ordinary function of (q, k, v, mask) plus a frozen `AttnSpec`; the lowering
pass traces it into the graph in place of each `cpfx::sharded_attention` placeholder, and tests
run it eagerly. Strategy follows the mesh:

    Ulysses (U > 1):  [B, H, S/N, D] -all-to-all-> [B, H/U, S/R, D]  (sequence gathered in the group)
    ring    (R > 1):  K/V blocks of the R ring peers visited, outputs merged by log-sum-exp (fp32)
    hybrid:           Ulysses inside the group, ring across groups, all-to-all back.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Literal

import torch
import torch.nn.functional as F

from cpfx import comm
from cpfx.graph_utils import tag
from cpfx.layout import Layout

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class AttnSpec:
    """Everything static a sharded attention needs, fixed per rank at compile time."""

    layout: Layout
    """Token layout of q, k and v (self-attention: all the same)."""
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    scale: float | None
    enable_gqa: bool
    device_type: str
    cp_rank: int
    ulysses: int
    """Ulysses degree U (1: no all-to-all)."""
    ring: int
    """Ring degree R (1: no ring)."""
    ulysses_index: int
    ring_index: int
    ulysses_group: str
    ring_group: str
    ring_rotate: Literal["allgather", "p2p"] = "p2p"
    head_padding: Literal["pad", "uneven"] = "pad"
    ring_ranks: tuple[int, ...] = ()
    """Global ranks of the ring group in ring order (peers for p2p)."""
    dtype: torch.dtype = torch.float32
    mask_shape: tuple[int, ...] | None = None
    """Global mask shape, left-padded with 1s to 4-D ([B|1, H|1, Sq|1, Sk|1]); None: no mask."""
    mask_ndim: int = 4
    mask_is_bool: bool = True

    def cp_rank_of(self, ring_index: int, ulysses_index: int) -> int:
        return ring_index * self.ulysses + ulysses_index

    def group_ranks(self, ring_index: int) -> list[int]:
        """CP ranks whose tokens form ring block `ring_index` after the Ulysses all-to-all."""
        return [self.cp_rank_of(ring_index, u) for u in range(self.ulysses)]

    def block_pieces(self, ring_index: int) -> list[tuple[int, int]]:
        return self.layout.ranks_pieces(self.group_ranks(ring_index))

    def block_len(self, ring_index: int) -> int:
        return sum(n for _, n in self.block_pieces(ring_index))

    def seq_sizes(self) -> tuple[int, list[int]]:
        """(this rank's token count, the token counts of its Ulysses group in rank order)."""
        group = self.group_ranks(self.ring_index)
        return self.layout.local_size(self.cp_rank), [self.layout.local_size(r) for r in group]

    def head_sizes(self, heads: int) -> list[int]:
        """Heads per Ulysses rank: uneven groups (padding-free) or padded equal groups."""
        if self.head_padding == "uneven":
            base, rem = divmod(heads, self.ulysses)
            return [base + (j < rem) for j in range(self.ulysses)]
        return [-(-heads // self.ulysses)] * self.ulysses

    def head_range(self, heads: int) -> tuple[int, int]:
        sizes = self.head_sizes(heads)
        return sum(sizes[: self.ulysses_index]), sizes[self.ulysses_index]

    @property
    def local_heads(self) -> int:
        """Query heads this rank attends over after the Ulysses all-to-all."""
        return self.head_sizes(self.heads)[self.ulysses_index]

    @property
    def padded_heads(self) -> int:
        return -(-self.heads // self.ulysses) * self.ulysses

    @property
    def padded_kv_heads(self) -> int:
        return -(-self.kv_heads // self.ulysses) * self.ulysses


# --- Ulysses all-to-alls --------------------------------------------------------------------


def seq_to_heads(x: torch.Tensor, spec: AttnSpec, heads: int, role: str) -> torch.Tensor:
    """[B, H, S_loc, D] -> [B, Hp/U, S_blk, D]: scatter heads, gather this group's tokens."""
    U, B, D = spec.ulysses, spec.batch, spec.head_dim
    s_loc, sizes = spec.seq_sizes()
    hp = -(-heads // U) * U
    if hp != heads:
        x = F.pad(x, (0, 0, 0, 0, 0, hp - heads))  # zero heads, dropped after attention
    x = x.reshape(B, U, hp // U, s_loc, D).permute(1, 3, 0, 2, 4)  # -> [U, S_loc, B, Hp/U, D]
    x = x.reshape(U * s_loc, B, hp // U, D)
    y = comm.all_to_all(x, sizes, [s_loc] * U, spec.ulysses_group, role)  # [S_blk, B, Hp/U, D]
    return y.permute(1, 2, 0, 3)  # -> [B, Hp/U, S_blk, D]


def seq_to_heads_fp8(x: torch.Tensor, spec: AttnSpec, heads: int, role: str) -> torch.Tensor:
    """`seq_to_heads` with an FP8 payload: e4m3 bytes + inline fp32 scale per (token, head)."""
    U, B, D = spec.ulysses, spec.batch, spec.head_dim
    s_loc, sizes = spec.seq_sizes()
    hp = -(-heads // U) * U
    if hp != heads:
        x = F.pad(x, (0, 0, 0, 0, 0, hp - heads))
    packed = torch.ops.cpfx.fp8_quantize(x, U)  # [B, Hp, S_loc, D] -> u8 [U, S_loc, B, Hp/U, D+4]
    packed = packed.reshape(U * s_loc, B, hp // U, D + 4)
    y = comm.all_to_all(
        packed, sizes, [s_loc] * U, spec.ulysses_group, role
    )  # u8 [S_blk, B, Hp/U, D+4]
    y = y.reshape(1, sum(sizes), B, hp // U, D + 4)
    return torch.ops.cpfx.fp8_dequantize(y, spec.dtype)  # -> [B, Hp/U, S_blk, D]


def heads_to_seq(y: torch.Tensor, spec: AttnSpec) -> torch.Tensor:
    """[B, Hp/U, S_blk, D] -> [B, H, S_loc, D]: the inverse all-to-all, padded heads dropped."""
    U, B, D, H = spec.ulysses, spec.batch, spec.head_dim, spec.heads
    s_loc, sizes = spec.seq_sizes()
    hp = spec.padded_heads
    y = y.permute(2, 0, 1, 3).contiguous()  # -> [S_blk, B, Hp/U, D]
    x = comm.all_to_all(y, [s_loc] * U, sizes, spec.ulysses_group, "o")  # [U * S_loc, B, Hp/U, D]
    x = x.reshape(U, s_loc, B, hp // U, D).permute(2, 0, 3, 1, 4)  # -> [B, U, Hp/U, S_loc, D]
    x = x.reshape(B, hp, s_loc, D)
    return x[:, :H] if hp != H else x


def heads_to_seq_fp8(y: torch.Tensor, spec: AttnSpec) -> torch.Tensor:
    """`heads_to_seq` with an FP8 payload."""
    U, B, D, H = spec.ulysses, spec.batch, spec.head_dim, spec.heads
    s_loc, sizes = spec.seq_sizes()
    hp = spec.padded_heads
    packed = torch.ops.cpfx.fp8_quantize(y, 1)  # [B, Hp/U, S_blk, D] -> u8 [1, S_blk, B, Hp/U, D+4]
    packed = packed.reshape(sum(sizes), B, hp // U, D + 4)
    x = comm.all_to_all(packed, [s_loc] * U, sizes, spec.ulysses_group, "o")  # u8 [U*S_loc, ...]
    x = torch.ops.cpfx.fp8_dequantize(x.reshape(U, s_loc, B, hp // U, D + 4), spec.dtype)
    return x[:, :H] if hp != H else x  # [B, Hp, S_loc, D] -> [B, H, S_loc, D]


def seq_to_heads_uneven(x, spec: AttnSpec, heads: int, role: str, fp8: bool = False):
    """Padding-free all-to-all for uneven head groups: one flat buffer with per-rank byte counts.

    [B, H, S_loc, D] -> [B, h_me, S_blk, D]; with `fp8`, rows travel as e4m3 + inline scale."""
    U, B, D = spec.ulysses, spec.batch, spec.head_dim
    s_loc, sizes = spec.seq_sizes()
    hs = spec.head_sizes(heads)
    me = hs[spec.ulysses_index]
    if fp8:
        rows, w = torch.ops.cpfx.fp8_quantize(x, 1).reshape(s_loc, B, heads, D + 4), D + 4
    else:
        rows, w = x.permute(2, 0, 1, 3), D  # [B, H, S_loc, D] -> [S_loc, B, H, D]
    offs = [sum(hs[:j]) for j in range(U)]
    buf = torch.cat([rows.narrow(2, offs[j], hs[j]).reshape(-1) for j in range(U)])
    y = comm.all_to_all(
        buf,
        [n * B * me * w for n in sizes],
        [s_loc * B * h * w for h in hs],
        spec.ulysses_group,
        role,
    )  # flat: peer j's [S_j, B, h_me, w] in order
    y = y.reshape(sum(sizes), B, me, w)
    if fp8:
        return torch.ops.cpfx.fp8_dequantize(y.reshape(1, sum(sizes), B, me, w), spec.dtype)
    return y.permute(1, 2, 0, 3)  # -> [B, h_me, S_blk, D]


def heads_to_seq_uneven(y, spec: AttnSpec, fp8: bool = False):
    """Inverse of `seq_to_heads_uneven`: [B, h_me, S_blk, D] -> [B, H, S_loc, D]."""
    U, B, D, H = spec.ulysses, spec.batch, spec.head_dim, spec.heads
    s_loc, sizes = spec.seq_sizes()
    hs = spec.head_sizes(H)
    me = hs[spec.ulysses_index]
    if fp8:
        rows, w = torch.ops.cpfx.fp8_quantize(y, 1).reshape(-1), D + 4
    else:
        rows, w = y.permute(2, 0, 1, 3).contiguous().reshape(-1), D  # [S_blk, B, h_me, D]
    x = comm.all_to_all(
        rows,
        [s_loc * B * h * w for h in hs],
        [n * B * me * w for n in sizes],
        spec.ulysses_group,
        "o",
    )  # flat: peer j's [S_loc, B, h_j, w] in order
    counts = [s_loc * B * h * w for h in hs]
    parts = [x.narrow(0, sum(counts[:j]), counts[j]).reshape(s_loc, B, hs[j], w) for j in range(U)]
    x = torch.cat(parts, 2)  # -> [S_loc, B, H, w]
    if fp8:
        return torch.ops.cpfx.fp8_dequantize(x.reshape(1, s_loc, B, H, w), spec.dtype)
    return x.permute(1, 2, 0, 3)  # -> [B, H, S_loc, D]


# --- masks -----------------------------------------------------------------------------------


def local_mask(
    mask: torch.Tensor | None,
    spec: AttnSpec,
    q_pieces: list[tuple[int, int]],
    k_pieces: list[tuple[int, int]],
) -> torch.Tensor | None:
    """The part of a global [.., Sq, Sk] mask that this rank's queries and key block need."""
    if mask is None:
        return None
    m = mask
    for _ in range(4 - spec.mask_ndim):
        m = m.unsqueeze(0)
    shape = spec.mask_shape
    if shape[1] > 1 and spec.ulysses > 1:  # per-head mask: keep this rank's head group
        start, n = spec.head_range(shape[1])
        if start + n > shape[1]:  # padded heads: their (discarded) rows may use any mask
            m = torch.cat([m, m.narrow(1, 0, 1).expand(-1, start + n - shape[1], -1, -1)], 1)
        m = m.narrow(1, start, n)
    if shape[2] > 1:
        m = comm.take_pieces(m, 2, q_pieces)
    if shape[3] > 1:
        m = comm.take_pieces(m, 3, k_pieces)
    return m


# --- local attention with log-sum-exp ------------------------------------------------------


def attention_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    spec: AttnSpec,
    shape: tuple[int, int, int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one K/V block: (out [B, h, Sq, D] in q's dtype, lse [B, h, Sq] fp32).

    `shape` is the static [B, h, Sq, Sk] of the score matrix."""
    bias = None
    if mask is not None:
        if spec.mask_is_bool:
            bias = torch.where(mask, 0.0, float("-inf")).to(spec.dtype)
        else:
            bias = mask.to(spec.dtype)
    if spec.device_type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=bias, scale=spec.scale
        )
    else:
        if bias is not None:
            bias = bias.expand(shape)
        out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, bias, True, 0.0, False, scale=spec.scale
        )
        lse = lse[..., : shape[2]]
    lse = lse.float()
    if mask is not None:
        # A row with no allowed key in this block contributes nothing (the CPU kernel reports 0).
        allowed = (mask if spec.mask_is_bool else mask > float("-inf")).any(-1)
        lse = lse.masked_fill(allowed.logical_not(), float("-inf"))
    return out, lse


def merge_lse(
    acc: torch.Tensor | None, acc_lse: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold one block's (out, lse) into the fp32 running (acc, acc_lse)."""
    out = out.float()
    if acc is None:
        return out, lse
    new = torch.logaddexp(acc_lse, lse)
    safe = torch.where(new == float("-inf"), torch.zeros_like(new), new)
    w_acc = torch.exp(acc_lse - safe).unsqueeze(-1)
    w_new = torch.exp(lse - safe).unsqueeze(-1)
    return acc * w_acc + out * w_new, new


# --- ring -------------------------------------------------------------------------------------


def ring_attention(q, k, v, mask, spec: AttnSpec, h: int) -> torch.Tensor:
    """Each rank's queries against every ring block of K/V; fp32 log-sum-exp merge.

    q, k, v: [B, h, S_blk, D] (h heads on this rank after any Ulysses all-to-all)."""
    R = spec.ring
    q_pieces = spec.block_pieces(spec.ring_index)
    sizes = [spec.block_len(j) for j in range(R)]
    longest = max(sizes)
    kv = torch.cat([k, v], 1)  # K and V travel together: one transfer per block
    rows = kv.permute(2, 0, 1, 3).contiguous()  # [B, 2h, S_blk, D] -> [S_blk, B, 2h, D]
    rows = comm.pad_rows(rows, sizes[spec.ring_index], longest, 4)
    st = (h, q_pieces, sizes[spec.ring_index])
    acc = acc_lse = None
    if spec.ring_rotate == "allgather":
        full = comm.all_gather_rows(  # [R * S_max, B, 2h, D]
            rows,
            R,
            spec.ring_group,
            "kv",
            shape=(longest, spec.batch, 2 * h, spec.head_dim),
            device_type=spec.device_type,
        )
        blocks = [full.narrow(0, j * longest, sizes[j]) for j in range(R)]
        for j in range(R):
            acc, acc_lse = _ring_step(q, blocks[j], mask, spec, st, j, acc, acc_lse)
    else:
        cur = rows
        for step in range(R):
            j = (spec.ring_index - step) % R  # the block that arrives at this step
            nxt = ring_shift(cur, spec) if step + 1 < R else None  # in flight during this step
            blk = cur.narrow(0, 0, sizes[j]) if sizes[j] != longest else cur
            acc, acc_lse = _ring_step(q, blk, mask, spec, st, j, acc, acc_lse)
            if nxt is not None:
                cur = tag(comm.C10D.wait_tensor(nxt), cpfx_wait="ring")
    return acc.to(q.dtype)


def _ring_step(q, rows, mask, spec, st, j, acc, acc_lse):
    h, q_pieces, s_q = st
    blk = rows.permute(1, 2, 0, 3)  # [S_j, B, 2h, D] -> [B, 2h, S_j, D]
    k_j, v_j = blk[:, :h], blk[:, h:]
    m_j = local_mask(mask, spec, q_pieces, spec.block_pieces(j))
    out, lse = attention_lse(q, k_j, v_j, m_j, spec, (spec.batch, h, s_q, spec.block_len(j)))
    return merge_lse(acc, acc_lse, out, lse)


def ring_shift(x: torch.Tensor, spec: AttnSpec) -> torch.Tensor:
    """Send `x` to the next ring rank, receive the previous rank's (async; wait with wait_tensor)."""
    me = spec.ring_index
    nxt = spec.ring_ranks[(me + 1) % spec.ring]
    prv = spec.ring_ranks[(me - 1) % spec.ring]
    t = torch.ops.cpfx.ring_send_recv(x, nxt, prv)
    return tag(t, cpfx_collective="ring_send_recv", cpfx_role="kv")


# --- the whole thing ---------------------------------------------------------------------------


def cp_attention(q, k, v, mask, spec: AttnSpec) -> torch.Tensor:
    """Exact attention over the full (sharded) sequence; q/k/v are this rank's [B, H, S_loc, D]."""
    gqa = spec.enable_gqa and spec.kv_heads != spec.heads
    kv_heads = spec.kv_heads
    if gqa and (spec.ring > 1 or spec.kv_heads % spec.ulysses or spec.heads % spec.ulysses):
        # K/V head groups must line up with the query head groups of each rank.
        rep = spec.heads // spec.kv_heads  # expand K/V heads so they can be split like Q's
        k = k.repeat_interleave(rep, 1)
        v = v.repeat_interleave(rep, 1)
        gqa, kv_heads = False, spec.heads
    if spec.ulysses > 1:
        q = _a2a_in(q, spec, spec.heads, "q")
        k = _a2a_in(k, spec, kv_heads, "k")
        v = _a2a_in(v, spec, kv_heads, "v")
    if spec.ring > 1:
        out = ring_attention(q, k, v, mask, spec, spec.local_heads)
    else:
        pieces = spec.block_pieces(spec.ring_index)
        m = local_mask(mask, spec, pieces, pieces)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=spec.scale, enable_gqa=gqa)
    if spec.ulysses > 1:
        back = (
            heads_to_seq_uneven(out, spec) if _uneven(spec, spec.heads) else heads_to_seq(out, spec)
        )
        out = tag(back, cpfx_a2a=("o", out, spec, spec.heads))
    return out


def _uneven(spec: AttnSpec, heads: int) -> bool:
    return spec.head_padding == "uneven" and heads % spec.ulysses != 0


def _a2a_in(x, spec: AttnSpec, heads: int, role: str):
    """seq_to_heads, with its endpoints recorded so `fp8_comm` can swap the implementation."""
    fn = seq_to_heads_uneven if _uneven(spec, heads) else seq_to_heads
    return tag(fn(x, spec, heads, role), cpfx_a2a=(role, x, spec, heads))
