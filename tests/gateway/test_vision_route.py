"""The gateway's media profile: images in chat for a local vision target, through a real
`sipp-gateway serve` (the tiny vision model and its projector), driven by the official
`openai` SDK and by plain HTTP on the native route.

Answers are compared with the same request run in-process by the library: the gateway
must hand the very image bytes to the engine, placed where the caller put them."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from sipp import ChatMessage, EndpointRef, SippClient

from ..make_tiny_vision import MMPROJ_NAME, generate
from ..remote.loopback import Action, Chunk, LoopbackServer, Request, Status
from ..test_vision import GREEDY, IMAGES, QUESTIONS, load_vision
from .test_server import TOKEN, Gateway, running_gateway

MAX_NEW = GREEDY.max_tokens


def _data_url(image: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(image).decode()


@pytest.fixture(scope="module")
def vision_gguf() -> Path:
    return generate()


def _images_host(req: Request) -> list[Action]:
    """An image server: PNGs by name, a 404, a redirect and an endless body."""
    name = req.path.strip("/").removesuffix(".png")
    if name in IMAGES:
        return [Status(200, {"content-type": "image/png"}), Chunk(IMAGES[name])]
    if name == "moved":
        return [Status(302, {"location": "http://127.0.0.1:1/elsewhere.png"})]
    if name == "huge":
        return [Status(200, {"content-type": "image/png"}), *[Chunk(bytes(1 << 20))] * 24]
    return [Status(404)]


@pytest.fixture(scope="module")
def images_host() -> Iterator[LoopbackServer]:
    server = LoopbackServer(_images_host)
    yield server
    server.close()


@pytest.fixture(scope="module")
def gateway(
    vision_gguf: Path, images_host: LoopbackServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    projector = vision_gguf.parent / MMPROJ_NAME

    def edit(toml: str) -> str:
        toml = toml.replace("max_request_bytes = 4096", "max_request_bytes = 33554432")
        toml = toml.replace(
            'stats = "basic"\n',
            f'stats = "basic"\nimage_url_hosts = ["127.0.0.1:{images_host.port}"]\n',
            1,
        )
        return toml.replace(
            "n_parallel = 2\n",
            f'n_parallel = 2\nn_threads = 1\n\n[targets.runtime.multimodal]\nprojector_path = "{projector}"\n',
        )

    with running_gateway(vision_gguf, tmp_path_factory.mktemp("vision"), edit) as gw:
        yield gw


@pytest.fixture(scope="module")
def library(vision_gguf: Path) -> Iterator[tuple[SippClient, EndpointRef]]:
    client, ref = load_vision(vision_gguf, n_parallel=1, n_ctx=512)
    yield client, ref
    client.close()


@pytest.fixture()
def oa(gateway: Gateway) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=gateway.public + "/v1", api_key=TOKEN, max_retries=0, timeout=300)
    yield c
    c.close()


def _expected(library: tuple[SippClient, EndpointRef], message: ChatMessage) -> str:
    client, ref = library
    return client.chat([message], endpoint=ref, options=GREEDY).result().text


def test_openai_image_url_parts_reach_the_engine_in_place(
    oa: openai.OpenAI, library: tuple[SippClient, EndpointRef]
) -> None:
    image = IMAGES["gradient"]
    expected = _expected(
        library, ChatMessage("user", f"Look: <__media__>{QUESTIONS[0]}", images=(image,))
    )
    content = [
        {"type": "text", "text": "Look: "},
        {"type": "image_url", "image_url": {"url": _data_url(image), "detail": "auto"}},
        {"type": "text", "text": QUESTIONS[0]},
    ]
    reply = oa.chat.completions.create(
        model="local",
        messages=[{"role": "user", "content": content}],  # type: ignore[list-item]
        max_tokens=MAX_NEW,
        temperature=0,
    )
    assert reply.choices[0].message.content == expected
    assert reply.usage is not None and reply.usage.prompt_tokens > 98
    chunks = oa.chat.completions.create(
        model="local",
        messages=[{"role": "user", "content": content}],  # type: ignore[list-item]
        max_tokens=MAX_NEW,
        temperature=0,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected


def test_native_chat_takes_images_as_data_urls(
    gateway: Gateway, library: tuple[SippClient, EndpointRef]
) -> None:
    image = IMAGES["stripes"]
    expected = _expected(library, ChatMessage("user", QUESTIONS[1], images=(image,)))
    body = {
        "model": "local",
        "messages": [
            {"role": "user", "content": QUESTIONS[1], "images": [_data_url(image, "image/webp")]}
        ],
        "max_tokens": MAX_NEW,
        "temperature": 0,
    }
    reply = httpx.post(
        f"{gateway.public}/v1/chat",
        json=body,
        headers={"authorization": f"Bearer {TOKEN}"},
        timeout=300,
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["text"] == expected


@pytest.mark.parametrize(
    ("url", "status", "fragment"),
    [
        # Never fetched: the gateway is not a way into hosts on its network.
        ("http://127.0.0.1:1/secret.png", 400, "not allowed"),
        ("http://localhost/secret.png", 400, "not allowed"),
        ("file:///etc/passwd", 400, "data: URL"),
        ("data:image/png;base64,%%%%", 400, "invalid base64"),
        (_data_url(b"not an image"), 400, "cannot be decoded"),
        ("data:image/png;base64," + "A" * (28 << 20), 413, "larger than"),
    ],
)
def test_bad_images_get_the_openai_error_envelope(
    gateway: Gateway, oa: openai.OpenAI, url: str, status: int, fragment: str
) -> None:
    body = {
        "model": "local",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is it?"},
                    {"type": "image_url", "image_url": {"url": url}},
                ],
            }
        ],
        "max_tokens": 4,
    }
    reply = httpx.post(
        f"{gateway.public}/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {TOKEN}"},
        timeout=300,
    )
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert fragment in error["message"] and "Traceback" not in reply.text
    # The target still serves, with its slots free.
    ok = oa.chat.completions.create(
        model="local", messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_image_urls_are_fetched_only_from_the_hosts_the_target_lists(
    gateway: Gateway, images_host: LoopbackServer, library: tuple[SippClient, EndpointRef]
) -> None:
    expected = _expected(library, ChatMessage("user", QUESTIONS[0], images=(IMAGES["checker"],)))

    def ask(path: str) -> httpx.Response:
        content = [
            {"type": "image_url", "image_url": {"url": f"{images_host.url}/{path}"}},
            {"type": "text", "text": QUESTIONS[0]},
        ]
        body = {
            "model": "local",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": MAX_NEW,
            "temperature": 0,
        }
        return httpx.post(
            f"{gateway.public}/v1/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {TOKEN}"},
            timeout=300,
        )

    reply = ask("checker.png")
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == expected
    for path, status, fragment in (
        ("missing.png", 400, "answered HTTP 404"),
        ("moved.png", 400, "answered HTTP 302"),  # redirects are not followed
        ("huge.png", 413, "larger than"),
    ):
        reply = ask(path)
        assert reply.status_code == status, reply.text
        assert fragment in reply.json()["error"]["message"]
    assert not any(r.path == "/elsewhere.png" for r in images_host.requests)


def test_images_to_a_provider_target_are_refused(oa: openai.OpenAI) -> None:
    content = [
        {"type": "text", "text": "What is it?"},
        {"type": "image_url", "image_url": {"url": _data_url(IMAGES["gradient"])}},
    ]
    with pytest.raises(openai.BadRequestError, match="local-only"):
        oa.chat.completions.create(
            model="mock-openai",
            messages=[{"role": "user", "content": content}],  # type: ignore[list-item]
            max_tokens=4,
        )


def test_image_url_hosts_config() -> None:
    from sipp.gateway.config import ConfigError, LocalTarget, parse_config

    from .test_config import _with

    config = parse_config(_with("targets[0].image_url_hosts", ["Images.Example.com", "h:8080"]))
    target = config.targets[0]
    assert isinstance(target, LocalTarget)
    assert target.image_url_hosts == ("images.example.com", "h:8080")
    assert isinstance(parse_config(_with("targets[0].backend", "cpu")).targets[0], LocalTarget)
    for bad in (["https://images.example.com"], "images.example.com", [3]):
        with pytest.raises(ConfigError) as info:
            parse_config(_with("targets[0].image_url_hosts", bad))
        assert any(p.startswith("targets[0].image_url_hosts") for p in info.value.problems)
