"""Pool tasks for the extra tiny models (tests/models_extra.py): register them, then run parity."""

from __future__ import annotations

from typing import Any

import torch


def _register() -> None:
    import tests.models as M
    import tests.tasks as T
    from tests.models_extra import EXTRA_BUILDERS

    M.BUILDERS.update(EXTRA_BUILDERS)
    if not getattr(T, "_extra_first", False):  # Z-Image returns a list of per-sample tensors
        first = T._first

        def _first(out: Any) -> torch.Tensor:
            o = first(out)
            return torch.stack(list(o)) if isinstance(o, (list, tuple)) else o

        T._first = _first
        T._extra_first = True


def parity(**kw: Any) -> dict[str, Any]:
    import tests.tasks as T

    _register()
    return T.parity(**kw)
