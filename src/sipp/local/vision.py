"""Vision chat prompts: media markers in messages, and image chunks in a token prompt.

The engine keeps one flat list of "tokens" per prompt and per slot (exactly what the
KV holds), and reuses KV across requests by comparing those lists. An image chunk
enters that list as placeholders: negative ids derived from the SHA-256 of the
image's encoded bytes and the position inside the chunk. So a later turn that repeats
the same image matches it like text, a different image diverges at its first
embedding, and a real token id (never negative) never equals a placeholder.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

from .._errors import InvalidRequestError
from .._types import ChatMessage, ImageLike
from ._mtmd import ImageChunk, Prompt

__all__ = ["MediaPrompt", "gather_images", "media_prompt"]

_ID_STRIDE = 1 << 20  # more embeddings than any one image chunk has


def gather_images(
    messages: Sequence[ChatMessage], media: Sequence[ImageLike] | None, marker: str
) -> tuple[list[ChatMessage], list[str | bytes | os.PathLike[str]]]:
    """The messages with one `marker` per image in their text, and the images in
    prompt order. `media` (request-level) joins the last user message's images."""
    messages = list(messages)
    if media:
        last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=None)
        if last_user is None:
            raise InvalidRequestError("media needs a user message to attach to", field="media")
        turn = messages[last_user]
        messages[last_user] = replace(turn, images=(*turn.images, *media))
    images: list[str | bytes | os.PathLike[str]] = []
    out: list[ChatMessage] = []
    for message in messages:
        found = message.content.count(marker)
        if not message.images:
            if found:
                raise InvalidRequestError(
                    f"a message without images contains the media marker {marker!r}"
                )
            out.append(message)
            continue
        if found not in (0, len(message.images)):
            raise InvalidRequestError(
                f"a message has {len(message.images)} images but {found} media markers "
                f"({marker!r}); write one per image, or none to put the images first"
            )
        content = message.content if found else marker * len(message.images) + message.content
        out.append(replace(message, content=content, images=()))
        images.extend(message.images)
    return out, images


@dataclass(eq=False)
class MediaPrompt:
    """Where the images sit in a flat prompt. Owns the mtmd chunks (`close()`)."""

    chunks: Prompt
    starts: list[int]  # prompt index of each image chunk's first embedding, ascending
    images: list[ImageChunk]

    def image_at(self, index: int) -> ImageChunk | None:
        """The image chunk that starts at prompt index `index`, if one does."""
        i = bisect.bisect_left(self.starts, index)
        return self.images[i] if i < len(self.starts) and self.starts[i] == index else None

    def text_run(self, index: int, end: int) -> int:
        """How far text goes from `index` (before `end`) until the next image starts."""
        i = bisect.bisect_left(self.starts, index)
        return min(end, self.starts[i]) - index if i < len(self.starts) else end - index

    def floor(self, n: int) -> int:
        """`n` moved back to the start of the image it would cut in two (a KV prefix
        must hold whole images: mtmd encodes and decodes one chunk at once)."""
        i = bisect.bisect_right(self.starts, n) - 1
        if i >= 0 and self.starts[i] < n < self.starts[i] + self.images[i].n_tokens:
            return self.starts[i]
        return n

    def close(self) -> None:
        self.chunks.close()


def media_prompt(chunks: Prompt) -> tuple[list[int], MediaPrompt]:
    """The flat prompt (tokens and placeholders) of tokenized chunks, and its images."""
    tokens: list[int] = []
    starts: list[int] = []
    images: list[ImageChunk] = []
    for part in chunks.parts:
        if isinstance(part, list):
            tokens.extend(part)
            continue
        if part.n_pos != part.n_tokens:  # the projector load refuses such models
            raise InvalidRequestError("this projector's image positions are not supported")
        base = -(int(part.key[:15] or "0", 16) + 1) * _ID_STRIDE
        starts.append(len(tokens))
        images.append(part)
        tokens.extend(base - i for i in range(part.n_tokens))
    if images and starts[-1] + images[-1].n_tokens == len(tokens):
        raise InvalidRequestError("the prompt must go on with text after its last image")
    return tokens, MediaPrompt(chunks, starts, images)
