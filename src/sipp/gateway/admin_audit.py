"""The admin audit list: which session changed what, on which replica.

In memory it is this process's newest `CAP` entries, reset on restart. With shared
controls (`[state] backend = "redis"`) each entry also goes to a capped Redis list every
replica reads, so an edit made on one replica is listed on all, each entry naming the
replica that made it. While Redis cannot be reached an entry stays here and is pushed
with the next entry or read once Redis is back; a read then answers with this
replica's own entries, marked `partial`, rather than failing.

An entry never holds a secret: the session is named by a digest of its id (the id is
the session's cookie), and the controls' details are addresses, names and numbers.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .store import StoreUnavailable

if TYPE_CHECKING:
    from .shared_controls import SharedControls

__all__ = ["CAP", "AuditLog", "session_label"]

logger = logging.getLogger("sipp.gateway.admin")

CAP = 500  # entries kept, here and in Redis


def session_label(sid: str) -> str:
    """A short name for session `sid` that tells sessions apart without revealing it."""
    return hashlib.sha256(sid.encode()).hexdigest()[:8]


class AuditLog:
    def __init__(self) -> None:
        self.entries: deque[dict[str, Any]] = deque(maxlen=CAP)  # this replica's, oldest first
        self._unshared: deque[dict[str, Any]] = deque(maxlen=CAP)  # not in Redis yet
        self._pushing = asyncio.Lock()  # one flush at a time, so no entry is pushed twice
        self._held = False  # entries are waiting for Redis (logged when it began)

    async def add(self, shared: SharedControls | None, entry: Mapping[str, Any]) -> None:
        self.entries.append(dict(entry))
        if shared is not None:
            self._unshared.append(dict(entry))
            await self._flush(shared)

    async def view(self, shared: SharedControls | None) -> dict[str, Any]:
        """What `GET <admin>/api/audit` answers: this replica's entries oldest first in
        memory; with Redis every replica's, newest first, and whether some are missing."""
        if shared is None:
            return {"entries": list(self.entries)}
        await self._flush(shared)
        try:
            entries = await shared.audit(CAP)
        except StoreUnavailable:
            return {
                "entries": list(reversed(self.entries)),
                "partial": True,
                "reason": "the shared state (Redis) is unavailable: this replica's entries only",
            }
        if self._unshared:  # Redis came back between the push and the read
            entries = sorted([*self._unshared, *entries], key=_at, reverse=True)[:CAP]
        return {"entries": entries, "partial": False}

    async def _flush(self, shared: SharedControls) -> None:
        async with self._pushing:
            while self._unshared:
                try:
                    await shared.push_audit(self._unshared[0], CAP)
                except StoreUnavailable:
                    if not self._held:  # once per outage: the dashboard polls the list
                        logger.warning(
                            "admin audit entries kept on this replica until Redis is back"
                        )
                    self._held = True
                    return
                self._unshared.popleft()
            self._held = False


def _at(entry: Mapping[str, Any]) -> float:
    at = entry.get("at")
    return float(at) if isinstance(at, (int, float)) else 0.0
