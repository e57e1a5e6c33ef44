"""`cpfx::ring_send_recv`: one ring step of batched point-to-point, as an async graph node.

The op issues `batch_isend_irecv` (send to `send_to`, receive from `recv_from`, global ranks, over
the group named `group_name`: cpfx's ring group, whose timeout is `timeout_s`) and returns the
receive buffer at once; the receive is registered with the functional-collective work registry, so
`_c10d_functional.wait_tensor(out)` is the wait node that scheduling passes and inductor
understand. Pending sends are completed before the next step's sends are issued, and by the
runtime at the end of each call. They are kept per thread: a call runs in one thread, so two
threads' calls never wait for (or drop) each other's sends.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class _PendingSends(threading.local):
    """This thread's sends that are still in flight (their buffers must stay alive until waited)."""

    def __init__(self) -> None:
        self.works: list[dist.Work] = []

    def __len__(self) -> int:
        return len(self.works)


_pending_sends = _PendingSends()


@torch.library.custom_op("cpfx::ring_send_recv", mutates_args=())
def ring_send_recv(
    x: torch.Tensor, send_to: int, recv_from: int, group_name: str
) -> torch.Tensor:
    finish_sends()
    out = torch.empty_like(x)
    if send_to == dist.get_rank():  # ring of one: nothing moves
        out.copy_(x)
        return out
    from torch.distributed.distributed_c10d import _resolve_process_group

    group = _resolve_process_group(group_name)  # type: ignore[arg-type]  # NewType of str
    ops = [
        dist.P2POp(dist.isend, x, send_to, group),
        dist.P2POp(dist.irecv, out, recv_from, group),
    ]
    works = dist.batch_isend_irecv(ops)
    *sends, recv = works if len(works) > 1 else (works[0], works[0])
    _pending_sends.works.extend(w for w in sends if w is not recv)
    torch._C._distributed_c10d._register_work(out, recv)
    return out


@ring_send_recv.register_fake
def _(x: torch.Tensor, send_to: int, recv_from: int, group_name: str) -> torch.Tensor:
    return torch.empty_like(x)


def _ring_send_recv_backward(
    ctx: Any, grad: torch.Tensor
) -> tuple[torch.Tensor, None, None, None]:
    """The block this rank sent went to `send_to`: its gradient comes back from there."""
    back = torch.ops.cpfx.ring_send_recv(grad.contiguous(), ctx.recv_from, ctx.send_to, ctx.group)
    return torch.ops._c10d_functional.wait_tensor(back), None, None, None


def _ring_send_recv_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    _, ctx.send_to, ctx.recv_from, ctx.group = inputs


ring_send_recv.register_autograd(_ring_send_recv_backward, setup_context=_ring_send_recv_setup)


def finish_sends() -> None:
    """Wait for this thread's sends issued by earlier ring steps (their buffers must stay valid
    until then)."""
    works = _pending_sends.works
    while works:
        works.pop().wait()
