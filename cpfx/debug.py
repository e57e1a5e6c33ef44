"""Counters that passes bump and tests assert on, what a graph's collectives send, and per-pass
graph dumps."""

from __future__ import annotations

import collections
import logging
import os
import re
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.fx as fx

from cpfx.errors import ConfigError
from cpfx.graph_utils import val

if TYPE_CHECKING:
    from cpfx.mesh import MeshInfo

log = logging.getLogger(__name__)

counters: collections.defaultdict[str, collections.Counter[str]] = collections.defaultdict(
    collections.Counter
)
"""`counters[pass_name][event]`, bumped by every rewrite; `reset_counters()` clears them."""


def reset_counters() -> None:
    counters.clear()


def collective_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Nodes that issue a collective (functional collectives or cpfx p2p ops), in graph order."""
    return [n for n in gm.graph.nodes if is_collective_start(n)]


def is_collective_start(n: fx.Node) -> bool:
    if n.op != "call_function":
        return False
    name = str(n.target)
    return ("_c10d_functional" in name and "wait_tensor" not in name) or name.startswith(
        "cpfx.ring_"
    )


def is_wait(n: fx.Node) -> bool:
    return n.op == "call_function" and "_c10d_functional.wait_tensor" in str(n.target)


def collective_kind(n: fx.Node) -> str:
    """`all_to_all_single`, `all_gather_into_tensor`, `cpfx.ring_send_recv`, ..."""
    return str(n.target).replace("_c10d_functional.", "").replace(".default", "")


def _group_size(n: fx.Node, mesh: MeshInfo) -> int:
    if "ring_send_recv" in str(n.target):
        return 2
    group = next((a for a in n.args if isinstance(a, str)), "")
    return {mesh.ulysses_group: mesh.ulysses, mesh.ring_group: mesh.ring}.get(group, mesh.world)


def sent_bytes(gm: fx.GraphModule, mesh: MeshInfo) -> list[tuple[str, str, int]]:
    """(kind, role, bytes this rank sends) per collective, from the local shapes in the graph.

    all_to_all: everything but the part kept locally; all_gather: the local block to each peer;
    all_reduce: 2 (g - 1) / g of the block (a ring all-reduce); ring send/recv: the whole
    block."""
    out = []
    for n in collective_nodes(gm):
        args: tuple[Any, ...] = n.args
        x = val(args[0])
        nbytes = x.numel() * x.element_size()
        kind = collective_kind(n)
        g = _group_size(n, mesh)
        if "all_to_all" in kind:
            in_splits = args[2]
            rows = x.shape[0]
            idx = mesh.ulysses_index if g == mesh.ulysses else mesh.cp_rank
            kept = in_splits[idx] if in_splits else rows // g
            nbytes = nbytes * (rows - kept) // max(rows, 1)
        elif "all_gather" in kind:
            nbytes = nbytes * (g - 1)
        elif "all_reduce" in kind:
            nbytes = 2 * nbytes * (g - 1) // g
        out.append((kind, n.meta.get("cpfx_role", ""), int(nbytes)))
    return out


def write_dump(
    dump_dir: str, rank: int, graph_id: int, index: int, name: str, gm: fx.GraphModule, header: str
) -> Path:
    """Write one readable graph file: `<dump_dir>/rank<r>/graph<g>/<nn>_<pass>.py`.

    Nothing below `dump_dir` (nor `dump_dir` itself) may be a symbolic link: each level is opened
    relative to its parent with O_NOFOLLOW, so a planted link is refused (ConfigError), never
    followed, and nothing is written outside `dump_dir`."""
    text = gm.print_readable(print_output=False, include_stride=False, include_device=False)
    parts = [f"rank{int(rank)}", f"graph{int(graph_id)}"]
    fname = f"{int(index):02d}_{_safe_name(name)}.py"
    write_file_below(dump_dir, parts, fname, f"# {header}\n{text}")
    return Path(dump_dir, *parts, fname)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip(".") or "_"


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


def write_file_below(root: str, parts: list[str], fname: str, text: str) -> None:
    """Create `root/parts.../fname` without following a symbolic link at any level at or below
    `root` (the directories are created if missing)."""
    root = os.path.abspath(root)
    os.makedirs(os.path.dirname(root), exist_ok=True)
    fd = _open_dir(None, root, root)
    try:
        path = root
        for part in parts:
            path = os.path.join(path, part)
            sub = _open_dir(fd, part, path)
            os.close(fd)
            fd = sub
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _NOFOLLOW
        try:
            f = os.open(fname, flags, 0o644, dir_fd=fd)
        except OSError as e:
            raise _refused(os.path.join(path, fname), e) from e
        with os.fdopen(f, "w") as out:
            out.write(text)
    finally:
        os.close(fd)


def _open_dir(parent_fd: int | None, name: str, path: str) -> int:
    """Open (creating it if missing) the directory `name` under `parent_fd` without following a
    symbolic link."""
    try:
        os.mkdir(name, 0o755, dir_fd=parent_fd)
    except FileExistsError:
        pass
    except OSError as e:
        raise _refused(path, e) from e
    try:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode):
            raise _refused(path, None)
        return os.open(name, os.O_RDONLY | _DIRECTORY | _NOFOLLOW, dir_fd=parent_fd)
    except OSError as e:
        raise _refused(path, e) from e


def _refused(path: str, e: OSError | None) -> ConfigError:
    kind = "a symbolic link" if os.path.islink(path) else "not a plain directory/file"
    return ConfigError(
        f"cpfx: refusing to write a graph dump at {path}: it is {kind}"
        + (f" ({e.strerror})" if e is not None and e.strerror else "")
        + "; dumps never follow links or write outside dump_dir. Remove it or choose another "
        "dump_dir (ParallelConfig(dump_dir=...) / CPFX_DUMP_DIR)."
    )


def model_dump_dir(root: str, model_class: str, ordinal: int) -> str:
    """The dump folder of one parallelized model: `<root>/<ModelClass>-<n>` (n counts the
    parallelize calls of this process, so it matches across ranks)."""
    return os.path.join(os.path.abspath(root), f"{_safe_name(model_class)}-{ordinal}")


def env_dump_dir() -> str | None:
    """Read CPFX_DUMP_DIR once, at the API boundary (passes never read the environment)."""
    return os.environ.get("CPFX_DUMP_DIR") or None
