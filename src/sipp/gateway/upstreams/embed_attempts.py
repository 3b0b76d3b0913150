"""The execute stage of an embeddings request: its target's pool, never its fallbacks.

An attempt picks a deployment with the pool's policy and is counted like a chat attempt
(in flight, breaker, latency, `sipp_gateway_upstream_attempts_total`, the attempt
headers). A failure is retried on the same target's deployments as its `retry` policy
says, within `max_attempts`; 400/401/403 and a context-length error are final.
`fallbacks` and `context_fallbacks` are not followed: another target is another model,
and its vectors cannot be compared with the ones the caller already stored.

Each attempt sends every input of the request the way `embed_all` does (one upstream
request to a provider, a window of runs on a local engine), so a retry repeats the
whole request, never part of it.
"""

from __future__ import annotations

import logging

from ..._descriptors import EndpointRef
from ..._errors import SippError
from ..._runs import AsyncTextRun
from ..._types import SippEmbeddingResponse
from ..activity import RequestRecord
from ..embed_batch import Track, embed_all
from ..request import GatewayRequest
from ..state import GatewayState
from ..target_options import TargetArgs
from ..upstream import failure_kind
from .execute import Attempt, Execution, deployment_endpoint, final_error, wait_to_retry

__all__ = ["EmbedExecution"]

logger = logging.getLogger("sipp.gateway.upstream")

_FINAL = ("context", "4xx", "error")  # the request's own fault: no other deployment helps


class EmbedExecution(Execution):
    """One embeddings request's attempts on its target's pool (`close`, `headers` and
    the failure log are the chat execution's)."""

    def __init__(
        self,
        state: GatewayState,
        rec: RequestRecord,
        req: GatewayRequest,
        request_id: str,
        track: Track,
    ) -> None:
        super().__init__(state, rec, req, request_id, _no_text_runs, ())
        self._track = track

    async def embeddings(self) -> list[SippEmbeddingResponse]:
        """Every input's embedding, in order, from the first attempt that succeeds."""
        pool = self.state.pools[self.primary]
        retry = pool.resilience.retry
        tried: set[str] = set()
        blocked: set[str] = set()  # out of this request: switched off, or asked a long wait
        failures = 0
        last: SippError | None = None
        while failures < retry.attempts and len(self.attempts) < pool.resilience.max_attempts:
            dep = pool.pick(tried | blocked)
            if dep.name in blocked:
                break
            try:
                ref = deployment_endpoint(self.state, pool, dep)
            except SippError as exc:
                logger.info("target %s: deployment %s skipped: %s", pool.name, dep.name, exc)
                blocked.add(dep.name)
                last = exc
                continue
            self._note()
            attempt = Attempt(self.state, pool, dep)
            self.attempts.append(attempt)
            tried.add(dep.name)
            try:
                embeddings = await self._embed(ref)
            except SippError as exc:
                kind = failure_kind(exc)
                attempt.end(kind)
                last = exc
                self._unnoted = (pool.name, exc)
                if kind in _FINAL:
                    break
                failures += 1
                if kind == "unavailable":
                    blocked.add(dep.name)
                    continue
                if kind not in retry.on:
                    break
                if not await wait_to_retry(retry, kind, exc, failures):
                    blocked.add(dep.name)
                continue
            attempt.first_output()
            attempt.end("ok")
            self.answered.append(attempt.label)
            return embeddings
        raise final_error(self.primary, last)

    async def _embed(self, ref: EndpointRef) -> list[SippEmbeddingResponse]:
        client, inputs = self.state.client, self.req.inputs
        if self.req.single_input:
            return [await self._track(client.embed(inputs[0], endpoint=ref))]
        return await embed_all(client, ref, inputs, self._track)


def _no_text_runs(ref: EndpointRef, args: TargetArgs) -> AsyncTextRun:
    raise AssertionError("an embeddings execution starts no text runs")
