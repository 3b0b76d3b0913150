"""Fetch the http(s) images of a chat request, for targets that allow the host.

A gateway that fetched any URL a caller names would let callers reach hosts on its
network (SSRF). So a target fetches nothing unless its TOML lists hosts in
`image_url_hosts`, and then only from exactly those hosts (a `host:port` entry also
pins the port), without following redirects, and reading at most `MAX_IMAGE_BYTES`
(declared length first, then as the body streams in).
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from urllib.parse import urlsplit

import httpx

from .._errors import InvalidRequestError, PayloadTooLargeError
from .._types import MAX_IMAGE_BYTES, ImageLike
from .config import LocalTarget, ProviderTarget
from .request import GatewayRequest, ImageURL

__all__ = ["FETCH_TIMEOUT", "fetch_images"]

FETCH_TIMEOUT = 10.0


def _allowed(url: str, hosts: tuple[str, ...]) -> bool:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username:
        return False
    host = parts.hostname.lower()
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return host in hosts or f"{host}:{port}" in hosts


async def _fetch(client: httpx.AsyncClient, url: str) -> bytes:
    try:
        async with client.stream("GET", url) as response:
            if response.status_code != 200:
                raise InvalidRequestError(
                    f"image URL {url} answered HTTP {response.status_code}", field="messages"
                )
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > MAX_IMAGE_BYTES:
                raise PayloadTooLargeError(f"image at {url} is larger than {MAX_IMAGE_BYTES} bytes")
            body = bytearray()
            async for block in response.aiter_bytes():
                body += block
                if len(body) > MAX_IMAGE_BYTES:
                    raise PayloadTooLargeError(
                        f"image at {url} is larger than {MAX_IMAGE_BYTES} bytes"
                    )
            if not body:
                raise InvalidRequestError(f"image URL {url} returned no bytes", field="messages")
            return bytes(body)
    except httpx.HTTPError as exc:
        raise InvalidRequestError(
            f"image URL {url} could not be fetched ({type(exc).__name__})", field="messages"
        ) from None


async def fetch_images(req: GatewayRequest, target: LocalTarget | ProviderTarget) -> GatewayRequest:
    """`req` with every pending image URL fetched into its message, or a 400/413."""
    if not req.image_urls:
        return req
    hosts = target.image_url_hosts if isinstance(target, LocalTarget) else ()
    for item in req.image_urls:
        if not _allowed(item.url, hosts):
            raise InvalidRequestError(
                f"image URL {item.url} is not allowed: the gateway fetches images only from "
                f"hosts the target lists in image_url_hosts (or send a data: URL)",
                field="messages",
            )
    async with httpx.AsyncClient(follow_redirects=False, timeout=FETCH_TIMEOUT) as client:
        fetched = await asyncio.gather(*(_fetch(client, i.url) for i in req.image_urls))
    assert req.messages is not None
    messages = list(req.messages)
    by_message: dict[int, list[tuple[ImageURL, bytes]]] = {}
    for item, data in zip(req.image_urls, fetched):
        by_message.setdefault(item.message, []).append((item, data))
    for index, items in by_message.items():
        images: list[ImageLike] = list(messages[index].images)
        for item, data in sorted(items, key=lambda pair: pair[0].index):
            images.insert(item.index, data)
        messages[index] = replace(messages[index], images=tuple(images))
    return replace(req, messages=tuple(messages), image_urls=())
