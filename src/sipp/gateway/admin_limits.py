"""The admin API's usage: each caller label's and target's configured limits and
budgets against what is used now, read from the state store (this process's memory,
or Redis shared by every replica) without charging anything. Caller labels only:
never a token value."""

from __future__ import annotations

from typing import Any

from .state import GatewayState
from .store import StoreUnavailable

__all__ = ["usage_view"]


async def usage_view(state: GatewayState) -> dict[str, Any]:
    backend = state.config.state.backend
    if state.shaper is None:
        return {"backend": backend, "available": True, "limits": []}
    try:
        limits = await state.shaper.usage()
    except StoreUnavailable:
        return {"backend": backend, "available": False, "limits": []}
    return {"backend": backend, "available": True, "limits": limits}
