"""Bad vision input: typed errors, the endpoint stays up, and the slot comes back.

Every request here goes to a one-slot load, and each error case is followed by a good
image request on that same slot: a leaked slot would leave it waiting forever (the
test's timeout would say so) and a crashed engine would fail it.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import pytest

from sipp import (
    ChatMessage,
    ContextOverflowError,
    ContextRuntimeConfig,
    EndpointRef,
    GatewayDescriptor,
    InvalidConfigError,
    InvalidRequestError,
    LocalModelDescriptor,
    LocalTextOptions,
    ModelLoadError,
    MultimodalRuntimeConfig,
    NativeRuntimeConfig,
    PayloadTooLargeError,
    ProviderDescriptor,
    SippClient,
    SippTextOptions,
    UnsupportedOperationError,
)

from .make_tiny_vision import MMPROJ_NAME, generate
from .test_vision import IMAGES, load_vision

GREEDY = SippTextOptions(max_tokens=4, temperature=0)
Client = tuple[SippClient, EndpointRef]


@pytest.fixture(scope="module")
def vision_gguf() -> Path:
    return generate()


@pytest.fixture(scope="module")
def one_slot(vision_gguf: Path) -> Iterator[Client]:
    client, ref = load_vision(vision_gguf, n_parallel=1, n_ctx=512)
    yield client, ref
    client.close()


def _still_serves(client: SippClient, ref: EndpointRef) -> None:
    message = ChatMessage("user", "What is in this picture?", images=(IMAGES["gradient"],))
    response = client.chat([message], endpoint=ref, options=GREEDY).result()
    assert response.usage is not None and response.usage.input_tokens > 98
    metrics = client.runtime_metrics(ref)
    assert metrics["busy_slots"] == 0 and metrics["running"] == 0


def _chat(
    client: SippClient, ref: EndpointRef, *images: object, text: str = "Describe it."
) -> None:
    message = ChatMessage("user", text, images=tuple(images))  # type: ignore[arg-type]
    client.chat([message], endpoint=ref, options=GREEDY).result()


def _png(width: int, height: int) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (width, height)).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize(
    ("image", "error", "fragment"),
    [
        (b"this is not an image", InvalidRequestError, "cannot be decoded"),
        (b"GIF89a" + bytes(64), InvalidRequestError, "cannot be decoded"),
        ("/nonexistent/picture.png", InvalidRequestError, "cannot read image"),
        ("data:image/png;base64,@@@@", InvalidRequestError, "invalid base64"),
        ("data:text/plain,hello", InvalidRequestError, "data:image/png;base64"),
        # 8000 x 6000 zeros compress to a few kB: refused from the header, undecoded.
        (_png(8000, 6000), PayloadTooLargeError, "pixels"),
        (b"\x89PNG" + bytes(21 << 20), PayloadTooLargeError, "larger than"),
    ],
)
def test_bad_images_are_typed_errors(
    one_slot: Client, image: object, error: type[Exception], fragment: str
) -> None:
    client, ref = one_slot
    with pytest.raises(error) as info:
        _chat(client, ref, image)
    assert fragment in str(info.value)
    _still_serves(client, ref)


def test_an_oversized_data_url_is_refused_before_decoding(one_slot: Client) -> None:
    client, ref = one_slot
    url = "data:image/png;base64," + "A" * (28 << 20)
    with pytest.raises(PayloadTooLargeError):
        _chat(client, ref, url)
    _still_serves(client, ref)


def test_markers_must_match_the_images(one_slot: Client) -> None:
    client, ref = one_slot
    with pytest.raises(InvalidRequestError, match="2 media markers"):
        _chat(client, ref, IMAGES["gradient"], text="<__media__> and <__media__>")
    with pytest.raises(InvalidRequestError, match="without images"):
        client.chat([ChatMessage("user", "a <__media__> here")], endpoint=ref).result()
    _still_serves(client, ref)


def test_images_need_chat(one_slot: Client) -> None:
    client, ref = one_slot
    local = LocalTextOptions(media=[IMAGES["gradient"]])
    with pytest.raises(UnsupportedOperationError, match="images need chat"):
        client.query("Describe it.", endpoint=ref, local=local).result()
    _still_serves(client, ref)


def test_image_embeddings_count_against_the_context(vision_gguf: Path) -> None:
    # Three images (98 embeddings each) and the text around them overflow 256 tokens.
    client, ref = load_vision(vision_gguf, n_parallel=1, n_ctx=256)
    try:
        _chat(client, ref, IMAGES["gradient"], IMAGES["checker"])  # 196 fit
        with pytest.raises(ContextOverflowError):
            _chat(client, ref, IMAGES["gradient"], IMAGES["checker"], IMAGES["stripes"])
        response = client.chat([ChatMessage("user", "Hi")], endpoint=ref, options=GREEDY).result()
        assert response.usage is not None
    finally:
        client.close()


def test_an_image_to_a_model_without_projector(vision_gguf: Path) -> None:
    client = SippClient()
    cfg = NativeRuntimeConfig(context=ContextRuntimeConfig(n_threads=1, n_ctx=256))
    ref = client.add("text-only", LocalModelDescriptor(vision_gguf, cfg))
    try:
        with pytest.raises(UnsupportedOperationError, match="without a vision projector"):
            _chat(client, ref, IMAGES["gradient"])
        with pytest.raises(UnsupportedOperationError, match="without a vision projector"):
            local = LocalTextOptions(media=[IMAGES["gradient"]])
            client.chat([ChatMessage("user", "Hi")], endpoint=ref, local=local).result()
        assert client.chat([ChatMessage("user", "Hi")], endpoint=ref, options=GREEDY).result()
    finally:
        client.close()


def test_a_projector_for_another_model_fails_the_load(vision_gguf: Path) -> None:
    from sipp.models import models_dir

    other = models_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf"
    cfg = NativeRuntimeConfig(
        context=ContextRuntimeConfig(n_threads=1, n_ctx=256),
        multimodal=MultimodalRuntimeConfig(projector_path=str(vision_gguf.parent / MMPROJ_NAME)),
    )
    client = SippClient()
    try:
        with pytest.raises(ModelLoadError, match="n_embd"):
            client.add("mismatch", LocalModelDescriptor(other, cfg))
    finally:
        client.close()


@pytest.mark.parametrize(
    ("multimodal", "error", "fragment"),
    [
        ({"use_gpu": True}, InvalidConfigError, "needs a GPU backend"),
        ({"projector_path": "/nonexistent/mmproj.gguf"}, ModelLoadError, "not found"),
    ],
)
def test_projector_load_errors(
    vision_gguf: Path, multimodal: dict[str, object], error: type[Exception], fragment: str
) -> None:
    fields: dict[str, object] = {"projector_path": str(vision_gguf.parent / MMPROJ_NAME)}
    fields.update(multimodal)
    cfg = NativeRuntimeConfig(
        context=ContextRuntimeConfig(n_threads=1, n_ctx=256),
        multimodal=MultimodalRuntimeConfig(**fields),  # type: ignore[arg-type]
    )
    client = SippClient()
    try:
        with pytest.raises(error, match=fragment):
            client.add("bad", LocalModelDescriptor(vision_gguf, cfg))
    finally:
        client.close()


def test_a_text_file_is_not_a_projector(vision_gguf: Path, tmp_path: Path) -> None:
    fake = tmp_path / "mmproj.gguf"
    fake.write_bytes(base64.b64decode("R0dVRg==") + bytes(64))  # GGUF magic, garbage after
    cfg = NativeRuntimeConfig(
        context=ContextRuntimeConfig(n_threads=1, n_ctx=256),
        multimodal=MultimodalRuntimeConfig(projector_path=str(fake)),
    )
    client = SippClient()
    try:
        with pytest.raises(ModelLoadError, match="could not load the projector"):
            client.add("bad", LocalModelDescriptor(vision_gguf, cfg))
    finally:
        client.close()


@pytest.mark.parametrize(
    "descriptor",
    [
        GatewayDescriptor("local", "http://127.0.0.1:9"),
        ProviderDescriptor("openai", "gpt-test", api_key="sk-test", base_url="http://127.0.0.1:9"),
    ],
)
def test_remote_endpoints_refuse_images_before_sending(descriptor: object) -> None:
    """Port 9 (discard) never answers: the refusal must come before any I/O."""
    client = SippClient()
    try:
        ref = client.add("remote", descriptor)  # type: ignore[arg-type]
        message = ChatMessage("user", "Describe it.", images=(IMAGES["gradient"],))
        with pytest.raises(InvalidRequestError, match="local-only"):
            client.chat([message], endpoint=ref).result()
    finally:
        client.close()
