"""Encoder-decoder (T5) query on a local target, proven against transformers.

The model is the tiny random-weight T5 of `tests/make_tiny_t5.py` (generated once into
the model cache). The reference is transformers' own `generate` on the very weights the
GGUF was converted from: greedy output must match token for token, and the log
probabilities of the chosen tokens must agree within `LOGPROB_TOLERANCE` (float32
weights on both sides). A greedy pick could differ only where the reference's top two
logits lie closer than the implementations may differ by: `test_greedy_has_no_near_ties`
checks that no step of these prompts comes near that.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sipp import (
    ChatMessage,
    ContextOverflowError,
    ContextRuntimeConfig,
    EndpointRef,
    GatewayDescriptor,
    InvalidConfigError,
    LocalModelDescriptor,
    LocalTextOptions,
    NativeRuntimeConfig,
    SamplingRuntimeConfig,
    SippClient,
    SippTextOptions,
    UnsupportedOperationError,
)

from .make_tiny_t5 import generate

PROMPTS = (
    "translate English to German: Hello, world.",
    "summarize: The cats play in the garden.",
    "question: Where is the river?",
    "Numbers 42",
    "The weather today is sunny.",
    "summarize: Trains leave the station every hour, except on Sunday mornings.",
)
MAX_NEW = 24
GREEDY = SippTextOptions(max_tokens=MAX_NEW, temperature=0)
# llama.cpp keeps K and V in float16 (its default cache type): measured differences in
# the chosen tokens' log probabilities reach 0.0073 on these prompts.
LOGPROB_TOLERANCE = 0.01
EOS = 1
Client = tuple[SippClient, EndpointRef]


@pytest.fixture(scope="module")
def t5_gguf() -> Path:
    return generate()


@pytest.fixture(scope="module")
def reference(t5_gguf: Path) -> Any:
    """transformers' T5 and the sentencepiece tokenizer, from the generated folder."""
    import sentencepiece as spm
    import torch
    from transformers import T5ForConditionalGeneration

    torch.set_num_threads(1)
    hf = t5_gguf.parent / "hf"
    model = T5ForConditionalGeneration.from_pretrained(hf).eval()
    return model, spm.SentencePieceProcessor(model_file=str(hf / "spiece.model"))


def _hf_greedy(reference: Any, prompt: str, n: int) -> tuple[list[int], list[float], float]:
    """(tokens up to EOS, log-probability of each, smallest top-2 logit gap)."""
    import torch

    model, sp = reference
    ids = torch.tensor([[*sp.encode(prompt), EOS]])
    with torch.no_grad():
        out = model.generate(
            ids,
            max_new_tokens=n,
            do_sample=False,
            num_beams=1,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0, 1:].tolist()  # past the decoder start token
    logprobs, gap = [], float("inf")
    for token, logits in zip(tokens, out.logits):
        row = logits[0].double()
        top = row.topk(2).values
        gap = min(gap, float(top[0] - top[1]))
        logprobs.append(float(torch.log_softmax(row, -1)[token]))
    if EOS in tokens:
        cut = tokens.index(EOS)
        tokens, logprobs = tokens[:cut], logprobs[:cut]
    return tokens, logprobs, gap


def _load(path: Path, **context: Any) -> tuple[SippClient, EndpointRef]:
    client = SippClient()
    # One ggml thread: the model is tiny, and spinning threads only fight the machine's
    # other work.
    cfg = NativeRuntimeConfig(context=ContextRuntimeConfig(n_threads=1, **context))
    return client, client.add("t5", LocalModelDescriptor(path, cfg))


@pytest.fixture(scope="module")
def t5(t5_gguf: Path) -> Iterator[Client]:
    client, ref = _load(t5_gguf, n_parallel=3)
    yield client, ref
    client.close()


def _ids(client: SippClient, ref: EndpointRef, prompt: str, options: SippTextOptions) -> list[int]:
    run = client.query(prompt, endpoint=ref, options=options, emit_tokens=True)
    return [t for batch in run for t in batch.token_ids]


def test_the_generated_model_is_an_encoder_decoder_gguf(t5_gguf: Path) -> None:
    from sipp.local import _llama

    model = _llama.LlamaModel(t5_gguf, _llama.ModelParams(0, 0, True, False, False))
    try:
        assert model.has_encoder and model.has_decoder and model.encoder_decoder
        assert model.meta("general.architecture") == "t5"
        assert model.decoder_start == 0  # T5 starts decoding from <pad>
    finally:
        model.close()


def test_tokenization_matches_sentencepiece(t5: Client, reference: Any) -> None:
    client, ref = t5
    _, sp = reference
    for prompt in PROMPTS:
        response = client.query(prompt, endpoint=ref, options=GREEDY).result()
        assert response.usage is not None
        # T5 appends </s> to the encoder input, as its tokenizer does.
        assert response.usage.input_tokens == len(sp.encode(prompt)) + 1


def test_greedy_has_no_near_ties(reference: Any) -> None:
    gaps = [_hf_greedy(reference, p, MAX_NEW)[2] for p in PROMPTS]
    # A greedy pick can flip only where two logits lie closer than twice what the
    # implementations may differ by; these prompts stay clear of that.
    assert min(gaps) > 2 * LOGPROB_TOLERANCE, gaps


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_and_logprobs_equal_transformers(
    t5: Client, reference: Any, prompt: str
) -> None:
    client, ref = t5
    expected, expected_lp, _ = _hf_greedy(reference, prompt, MAX_NEW)
    options = LocalTextOptions(logprobs=True)
    run = client.query(prompt, endpoint=ref, options=GREEDY, local=options, emit_tokens=True)
    batches = list(run)
    assert [t for b in batches for t in b.token_ids] == expected
    logprobs = [lp.logprob for b in batches for lp in b.logprobs]
    assert len(logprobs) == len(expected_lp)
    for ours, theirs in zip(logprobs, expected_lp):
        assert abs(ours - theirs) < LOGPROB_TOLERANCE
    assert run.result().finish_reason == ("length" if len(expected) == MAX_NEW else "stop")


def test_streaming_equals_final(t5: Client) -> None:
    client, ref = t5
    for prompt in PROMPTS[:3]:
        run = client.query(prompt, endpoint=ref, options=GREEDY, emit_tokens=True)
        batches = list(run)
        final = run.result()
        assert "".join(b.text for b in batches) == final.text
        assert final.text == client.query(prompt, endpoint=ref, options=GREEDY).result().text


def test_stop_strings_cut_the_output(t5: Client) -> None:
    client, ref = t5
    prompt = PROMPTS[1]
    full = client.query(prompt, endpoint=ref, options=GREEDY).result().text
    stop = "coder"
    assert stop in full
    options = SippTextOptions(max_tokens=MAX_NEW, temperature=0, stop=[stop])
    response = client.query(prompt, endpoint=ref, options=options).result()
    assert response.finish_reason == "stop"
    assert response.text == full[: full.index(stop)]


def test_seeded_sampling_repeats_and_differs_from_greedy(t5: Client) -> None:
    client, ref = t5
    prompt = PROMPTS[1]
    greedy = _ids(client, ref, prompt, GREEDY)
    hot = SippTextOptions(max_tokens=MAX_NEW, temperature=1.5)
    runs = {}
    for seed in (1, 2, 3):
        local = LocalTextOptions(sampling=SamplingRuntimeConfig(seed=seed, top_k=0, min_p=0.0))
        first = client.query(prompt, endpoint=ref, options=hot, local=local).result()
        again = client.query(prompt, endpoint=ref, options=hot, local=local).result()
        assert first.text == again.text
        runs[seed] = first.text
    greedy_text = client.query(prompt, endpoint=ref, options=GREEDY).result().text
    assert greedy and any(text != greedy_text for text in runs.values())


def test_concurrent_requests_each_equal_their_solo_output(t5: Client) -> None:
    """Requests that join while others decode encode every running prompt again (one
    encoder output per llama.cpp context): none of them may change another's output."""
    client, ref = t5
    long_opts = SippTextOptions(max_tokens=200, temperature=0)
    solo_long = _ids(client, ref, PROMPTS[0], long_opts)
    solos = [_ids(client, ref, p, GREEDY) for p in PROMPTS[1:]]
    before = client.runtime_metrics(ref)

    long_run = client.query(PROMPTS[0], endpoint=ref, options=long_opts, emit_tokens=True)
    stream = iter(long_run)
    long_ids = list(next(stream).token_ids)  # it is decoding: the others join mid-way
    runs = [client.query(p, endpoint=ref, options=GREEDY, emit_tokens=True) for p in PROMPTS[1:]]
    results: list[list[int]] = [[] for _ in runs]

    def drain(i: int) -> None:
        results[i] = [t for batch in runs[i] for t in batch.token_ids]

    threads = [threading.Thread(target=drain, args=(i,)) for i in range(len(runs))]
    for thread in threads:
        thread.start()
    long_ids += [t for batch in stream for t in batch.token_ids]
    for thread in threads:
        thread.join(timeout=120)
    assert long_ids == solo_long
    assert results == solos
    after = client.runtime_metrics(ref)
    steps = after["steps"] - before["steps"]
    busy = after["busy_slot_steps"] - before["busy_slot_steps"]
    assert busy > steps  # some steps decoded several sequences at once
    assert after["busy_slots"] == 0


def test_encoder_room_queues_what_does_not_fit(t5_gguf: Path) -> None:
    """One encode must hold every running prompt (llama.cpp encodes in one micro-batch):
    a request that would overflow it waits for room, and still gets its own output."""
    client, ref = _load(t5_gguf, n_parallel=4, n_batch=48, n_ubatch=48)
    try:
        solos = [_ids(client, ref, p, GREEDY) for p in PROMPTS]
        runs = [client.query(p, endpoint=ref, options=GREEDY, emit_tokens=True) for p in PROMPTS]
        assert [[t for b in run for t in b.token_ids] for run in runs] == solos
        with pytest.raises(ContextOverflowError, match="encoder reads at most 48"):
            client.query(" ".join(PROMPTS), endpoint=ref, options=GREEDY).result()
        assert client.query(PROMPTS[3], endpoint=ref, options=GREEDY).result().text
    finally:
        client.close()


def test_cancel_frees_the_slot(t5_gguf: Path) -> None:
    client, ref = _load(t5_gguf, n_parallel=1, n_ctx=4096)
    try:
        solo = client.query(PROMPTS[2], endpoint=ref, options=GREEDY).result().text
        run = client.query(
            PROMPTS[1], endpoint=ref, options=SippTextOptions(temperature=0), emit_tokens=True
        )
        next(iter(run))
        run.cancel("enough")
        assert run.result(timeout=120).finish_reason == "cancelled"
        # The only slot is free again, and the next request runs on fresh encoder state.
        assert client.query(PROMPTS[2], endpoint=ref, options=GREEDY).result().text == solo
        metrics = client.runtime_metrics(ref)
        assert metrics["busy_slots"] == 0 and metrics["cancelled"] == 1
    finally:
        client.close()


def test_chat_without_a_template_is_refused(t5: Client) -> None:
    client, ref = t5
    with pytest.raises(UnsupportedOperationError, match="use query"):
        client.chat([ChatMessage("user", "hi")], endpoint=ref).result()


def test_embed_is_refused(t5: Client, t5_gguf: Path) -> None:
    client, ref = t5
    with pytest.raises(UnsupportedOperationError, match="encoder-decoder"):
        client.embed("hi", endpoint=ref).result()
    with pytest.raises(InvalidConfigError, match="encoder-decoder"):
        _load(t5_gguf, embeddings=True, pooling="mean")


def test_the_gateway_serves_query_on_a_t5_target(
    t5_gguf: Path, t5: Client, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The spec's route to a local encoder-decoder target over HTTP is query: the native
    route through a gateway endpoint, and OpenAI's completions through the official SDK."""
    import openai

    from .gateway.test_server import TOKEN, running_gateway

    client, ref = t5
    expected = client.query(PROMPTS[1], endpoint=ref, options=GREEDY).result().text
    with running_gateway(t5_gguf, tmp_path_factory.mktemp("t5-gateway")) as gw:
        with SippClient() as remote:
            target = remote.add(
                "gw",
                GatewayDescriptor(
                    "local", gw.public, authentication_kind="bearer", authentication_value=TOKEN
                ),
            )
            assert remote.query(PROMPTS[1], endpoint=target, options=GREEDY).result().text == (
                expected
            )
            run = remote.query(PROMPTS[1], endpoint=target, options=GREEDY, emit_tokens=True)
            assert "".join(batch.text for batch in run) == expected
            with pytest.raises(UnsupportedOperationError):
                remote.chat([ChatMessage("user", "hi")], endpoint=target).result()
        oa = openai.OpenAI(base_url=gw.public + "/v1", api_key=TOKEN, max_retries=0, timeout=120)
        try:
            done = oa.completions.create(
                model="local", prompt=PROMPTS[1], max_tokens=MAX_NEW, temperature=0
            )
        finally:
            oa.close()
        assert done.choices[0].text == expected
