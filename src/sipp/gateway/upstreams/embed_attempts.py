"""The execute stage of an embeddings request: its target's pool, never its fallbacks.

An attempt picks a deployment with the pool's policy and is counted like a chat attempt
(in flight, breaker, latency, `sipp_gateway_upstream_attempts_total`, the attempt
headers). A failure is retried on the same target's deployments as its `retry` policy
says, within `max_attempts`; 400/401/403 and a context-length error are final. Limits
as for chat: the request's reservation covers the first attempt, each retry reserves
again on the target's limits.
`fallbacks` and `context_fallbacks` are not followed: another target is another model,
and its vectors cannot be compared with the ones the caller already stored.

Each attempt sends every input of the request the way `embed_all` does (one upstream
request to a provider, a window of runs on a local engine), so a retry repeats the
whole request, never part of it.
"""

from __future__ import annotations

from ..._descriptors import EndpointRef
from ..._runs import AsyncTextRun
from ..._types import SippEmbeddingResponse
from ..activity import RequestRecord
from ..embed_batch import Track, embed_all
from ..request import GatewayRequest
from ..shaping import Reservation
from ..state import GatewayState
from ..target_options import NO_ARGS, TargetArgs
from .execute import Attempt, Execution

__all__ = ["EmbedExecution"]


class EmbedExecution(Execution):
    """One embeddings request's attempts on its target's pool: the chat execution's
    attempt loop (deployments, retries, limits per attempt) for one choice, without
    fallbacks."""

    def __init__(
        self,
        state: GatewayState,
        rec: RequestRecord,
        req: GatewayRequest,
        request_id: str,
        track: Track,
        covered: Reservation | None = None,
    ) -> None:
        """`covered`: the request's reservation on the target's limits (its first attempt's)."""
        super().__init__(
            state, rec, req, request_id, _no_text_runs, (NO_ARGS,), covered, fallbacks=False
        )
        self._track = track

    async def embeddings(self) -> list[SippEmbeddingResponse]:
        """Every input's embedding, in order, from the first attempt that succeeds."""
        return await self._choice(0, self._embed)

    async def _embed(
        self, attempt: Attempt, ref: EndpointRef, args: TargetArgs
    ) -> list[SippEmbeddingResponse]:
        client, inputs = self.state.client, self.req.inputs
        if self.req.single_input:
            embeddings = [await self._track(client.embed(inputs[0], endpoint=ref))]
        else:
            embeddings = await embed_all(client, ref, inputs, self._track)
        attempt.first_output()
        attempt.used = sum(e.usage.total_tokens for e in embeddings if e.usage is not None)
        attempt.end("ok")
        return embeddings


def _no_text_runs(ref: EndpointRef, args: TargetArgs) -> AsyncTextRun:
    raise AssertionError("an embeddings execution starts no text runs")
