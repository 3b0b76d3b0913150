from __future__ import annotations

import types

import pytest

import sipp
from sipp import (
    CacheRuntimeConfig,
    ChatMessage,
    ContextRuntimeConfig,
    InvalidConfigError,
    InvalidRequestError,
    LocalTextOptions,
    NativeRuntimeConfig,
    SamplingRuntimeConfig,
    SchedulerRuntimeConfig,
    SippTextOptions,
)


def test_all_matches_public_names() -> None:
    public = {
        name
        for name, value in vars(sipp).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert set(sipp.__all__) - {"__version__"} == public - {"annotations"}
    names = [n for n in sipp.__all__ if n != "__version__"]
    assert names == sorted(names)


def test_every_public_error_has_a_stable_code() -> None:
    codes = {}
    for name in sipp.__all__:
        obj = getattr(sipp, name)
        if isinstance(obj, type) and issubclass(obj, sipp.SippError) and obj is not sipp.SippError:
            codes[name] = obj.code
    assert len(set(codes.values())) == len(codes), codes


@pytest.mark.parametrize(
    "build, fragment",
    [
        (lambda: ContextRuntimeConfig(n_ctxx=10), "unknown field n_ctxx"),
        (lambda: ContextRuntimeConfig(2048), "keyword arguments only"),
        (lambda: ContextRuntimeConfig(n_ctx=-1), "n_ctx must be >= 16"),
        (lambda: ContextRuntimeConfig(n_ctx="big"), "must be an integer"),
        (lambda: ContextRuntimeConfig(pooling="max", embeddings=True), "pooling must be one of"),
        (lambda: ContextRuntimeConfig(pooling="mean"), "only applies with embeddings=True"),
        (lambda: SamplingRuntimeConfig(top_p=1.5), "top_p must be between"),
        (lambda: SamplingRuntimeConfig(samplers=["top_k", "typical"]), "samplers must list"),
        (lambda: SamplingRuntimeConfig(mirostat=2), "not supported by this runtime yet"),
        (lambda: SamplingRuntimeConfig(logit_bias={5: float("nan")}), "not NaN"),
        (lambda: SamplingRuntimeConfig(seed=2**32), "seed must be <= 4294967295"),
        # past a float's range: math.isnan and float() raised OverflowError on these
        (lambda: SamplingRuntimeConfig(temperature=10**400), "must be a number"),
        (lambda: SamplingRuntimeConfig(logit_bias={5: 10**400}), "must map token ids"),
        (lambda: SamplingRuntimeConfig(repeat_penalty=0.0), "repeat_penalty must be > 0"),
        # past 4,300 digits str() itself raises: the message names the size instead
        (lambda: SamplingRuntimeConfig(seed=10**5000), "an integer of 16610 bits"),
        (lambda: CacheRuntimeConfig(max_snapshot_entries=4), "need mode='snapshot'"),
        (
            lambda: CacheRuntimeConfig(mode="snapshot", retained_prefix_tokens=4),
            "not supported by this runtime yet",
        ),
        (lambda: CacheRuntimeConfig(mode="snapshot", max_snapshot_bytes=-1), "must be >= 0"),
        (lambda: SchedulerRuntimeConfig(policy="lifo"), "policy must be one of fifo"),
        (lambda: NativeRuntimeConfig(context={"n_ctx": 5}), "must be a ContextRuntimeConfig"),
        (lambda: sipp.MultimodalRuntimeConfig(image_max_tokens=64), "needs projector_path"),
        (
            lambda: sipp.MultimodalRuntimeConfig(
                projector_path="p.gguf", image_min_tokens=9, image_max_tokens=4
            ),
            "exceeds image_max_tokens",
        ),
        (lambda: sipp.ResidencyRuntimeConfig(require_gpu_lease=True), "residency leasing"),
        (lambda: sipp.PlacementRuntimeConfig(tensor_split=[0.5, 0.5]), "not supported"),
    ],
)
def test_runtime_config_rejects_bad_or_unsupported_fields(build, fragment) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidConfigError) as info:
        build()
    assert fragment in str(info.value)
    assert info.value.code == "invalid_config"


def test_runtime_config_groups_default_and_merge() -> None:
    config = NativeRuntimeConfig(context=ContextRuntimeConfig(n_ctx=2048))
    assert config.context.n_ctx == 2048
    assert config.sampling == SamplingRuntimeConfig()
    merged = SamplingRuntimeConfig(seed=3).merged_over(SamplingRuntimeConfig(top_k=5, seed=1))
    assert (merged.seed, merged.top_k) == (3, 5)


@pytest.mark.parametrize(
    "build, fragment",
    [
        (lambda: SippTextOptions(max_tokens=-1), "max_tokens must be >= 1"),
        (lambda: SippTextOptions(max_tokens=2.5), "max_tokens must be an integer"),
        (lambda: SippTextOptions(temperature=-0.1), "temperature must be >= 0"),
        (lambda: SippTextOptions(temperature=float("nan")), "temperature must be a number"),
        (lambda: SippTextOptions(top_p=0), "top_p must be in (0, 1]"),
        (lambda: SippTextOptions(top_p=10**400), "top_p must be a number"),
        (lambda: SippTextOptions(max_tokens=-(10**5000)), "an integer of 16610 bits"),
        (lambda: SippTextOptions(stop=[""]), "non-empty strings"),
        (lambda: ChatMessage("robot", "hi"), "unknown chat role 'robot'"),
        (lambda: ChatMessage("user", 5), "content must be a string"),
        (lambda: ChatMessage.coerce({"role": "user"}), "needs the keys"),
        (lambda: LocalTextOptions(grammar="root ::= x", json_schema={}), "not both"),
        (lambda: LocalTextOptions(context_key=""), "non-empty string"),
        (lambda: LocalTextOptions(media=[42]), "an image is a file path, bytes or a data URL"),
    ],
)
def test_request_options_reject_bad_values(build, fragment) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidRequestError) as info:
        build()
    assert fragment in str(info.value)


def test_stop_accepts_a_single_string() -> None:
    assert SippTextOptions(stop="END").stop == ("END",)


def test_responses_read_like_mappings() -> None:
    usage = sipp.Usage(1, 2, 3)
    response = sipp.SippTextResponse("hi", "stop", usage)
    assert response["text"] == "hi"
    assert response["usage"]["total_tokens"] == 3
    assert response.to_dict()["usage"] == {"input_tokens": 1, "output_tokens": 2, "total_tokens": 3}
    assert "finish_reason" in response
    with pytest.raises(KeyError):
        response["nope"]


def test_logprobs_read_like_mappings_and_nest_in_to_dict() -> None:
    top = sipp.TopLogprob("hi", (104, 105), -0.25)
    token = sipp.TokenLogprob("hi", (104, 105), -0.25, (top,))
    response = sipp.SippTextResponse("hi", "stop", logprobs=(token,))
    assert response["logprobs"][0]["top"][0]["bytes"] == (104, 105)
    assert response.to_dict()["logprobs"] == [
        {"token": "hi", "bytes": (104, 105), "logprob": -0.25, "top": [top.to_dict()]}
    ]
    assert sipp.SippTextResponse("hi", "stop").logprobs is None
    assert sipp.TokenBatch("hi").logprobs == ()
