"""Vision chat: image prefill and time to first token, sipp vs llama.cpp's `llama-mtmd-cli`.

One 224x224 PNG and one question, on the tiny vision model the tests generate
(tests/make_tiny_vision.py) or --model/--mmproj; `llama-mtmd-cli` is built from the
llama.cpp the pinned llama-cpp-python vendors, with the same flags (bench/_llama_tools.py).
Each side runs in its own process per round (one llama context per process: two in one
process fight over 2 cores, docs/architecture.md), and rounds alternate which side goes
first. Same model, projector, threads, context size, flash attention off (text context
and vision encoder; sipp's default leaves the encoder's to llama.cpp), greedy, one
generated token. Both warm up before the measured image: mtmd encodes a dummy image at
load on both sides, and sipp also answers one chat with another image first.

What is compared, from each side's own timers:

* image prefill: the vision encoder plus decoding its embeddings into the context, summed
  over the image's chunks (this model's preprocessing gives an overview and one tile).
  sipp: `runtime_metrics()["image_prefill_ms"]`; mtmd-cli (run with -v, which stamps each
  log line to the microsecond): from each "encoding mtmd batch" line to its "image
  decoded" line.
* time to first token: from the engine taking the tokenized prompt to the first token
  sampled. sipp: `LocalStats.prefill_ms`; mtmd-cli: from its last tokenizer line
  (`add_text`) to its first `llama_perf_context_print` line, printed once the one token
  is out. Neither counts reading the PNG or mtmd's preprocessing, done before that.

Prints each round, then medians with spread and the ratio sipp / mtmd-cli (goal: within
10 %).

    ./dev bench vision_prefill [--rounds 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import io
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _llama_tools import ensure_tools, tool_env
from _stats import spread

QUESTION = "What is in this picture?"
# common's log stamp: minutes.seconds.milliseconds.microseconds
_STAMP = re.compile(r"^(\d+)\.(\d\d)\.(\d{3})\.(\d{3}) \w (.*)$")


def _tiny_vision() -> tuple[Path, Path]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from make_tiny_vision import MMPROJ_NAME, generate

    model = generate()
    return model, model.parent / MMPROJ_NAME


def _png(seed: int, size: int = 224) -> bytes:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def sipp_side(model: str, mmproj: str, image: str, threads: int, ctx: int) -> None:
    """Child process: load, warm up on another image, measure one request; print JSON."""
    from sipp import (
        CacheRuntimeConfig,
        ChatMessage,
        ContextRuntimeConfig,
        LocalModelDescriptor,
        MultimodalRuntimeConfig,
        NativeRuntimeConfig,
        SippClient,
        SippTextOptions,
    )

    cfg = NativeRuntimeConfig(
        # Flash attention off everywhere, as mtmd-cli's -fa off: the projector would
        # otherwise keep llama.cpp's automatic choice.
        context=ContextRuntimeConfig(n_threads=threads, n_ctx=ctx, flash_attention=False),
        cache=CacheRuntimeConfig(mode="off"),  # the measured image is encoded, never reused
        multimodal=MultimodalRuntimeConfig(projector_path=mmproj),
    )
    one = SippTextOptions(max_tokens=1, temperature=0)
    with SippClient() as client:
        ref = client.add("vision", LocalModelDescriptor(model, cfg))
        warm = ChatMessage("user", QUESTION, images=(_png(99),))
        client.chat([warm], endpoint=ref, options=one).result()
        before = client.runtime_metrics(ref)["image_prefill_ms"]
        message = ChatMessage("user", QUESTION, images=(Path(image),))
        response = client.chat([message], endpoint=ref, options=one).result()
        image_ms = client.runtime_metrics(ref)["image_prefill_ms"] - before
    assert response.local_stats is not None
    print(json.dumps({"image_ms": image_ms, "ttft_ms": response.local_stats.prefill_ms}))


def _run_sipp(args: argparse.Namespace, image: Path) -> dict[str, float]:
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            str(args.model),
            str(args.mmproj),
            str(image),
            str(args.threads),
            str(args.ctx),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _run_cli(args: argparse.Namespace, image: Path) -> dict[str, float]:
    cli = ensure_tools() / "llama-mtmd-cli"
    out = subprocess.run(
        [
            str(cli),
            "-m",
            str(args.model),
            "--mmproj",
            str(args.mmproj),
            "--image",
            str(image),
            "-p",
            QUESTION,
            "-n",
            "1",
            "--temp",
            "0",
            "-t",
            str(args.threads),
            "-c",
            str(args.ctx),
            "-fa",
            "off",
            "-v",
        ],
        capture_output=True,
        text=True,
        env=tool_env(),
        check=True,
    )
    stamped = []
    for line in (out.stderr + out.stdout).splitlines():
        m = _STAMP.match(line)
        if m:
            minutes, seconds, ms, us = (int(g) for g in m.groups()[:4])
            stamped.append((minutes * 60_000 + seconds * 1000 + ms + us / 1000, m.group(5)))
    starts = [t for t, text in stamped if text.startswith("encoding mtmd batch")]
    ends = [t for t, text in stamped if text.startswith("image decoded")]
    first_encode = starts[0] if starts else 0.0
    began = [t for t, text in stamped if text.startswith("add_text") and t <= first_encode]
    perf = [t for t, text in stamped if text.startswith("llama_perf_context_print")]
    if not starts or len(starts) != len(ends) or not began or not perf:
        raise SystemExit(f"llama-mtmd-cli printed no timings:\n{out.stderr[-3000:]}")
    return {
        "image_ms": sum(end - start for start, end in zip(starts, ends)),
        "ttft_ms": perf[0] - began[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--mmproj", type=Path)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ctx", type=int, default=1024)
    args = parser.parse_args()
    if args.model is None or args.mmproj is None:
        args.model, args.mmproj = _tiny_vision()
    ensure_tools()
    results: dict[str, dict[str, list[float]]] = {
        side: {"image_ms": [], "ttft_ms": []} for side in ("sipp", "mtmd-cli")
    }
    with tempfile.TemporaryDirectory(prefix="sipp-vision-bench-") as tmp:
        image = Path(tmp) / "image.png"
        image.write_bytes(_png(1))
        for r in range(args.rounds):
            order = [("sipp", _run_sipp), ("mtmd-cli", _run_cli)]
            if r % 2:
                order.reverse()
            line = [f"round {r + 1}:"]
            for side, run in order:
                got = run(args, image)
                for key, value in got.items():
                    results[side][key].append(value)
                line.append(
                    f"{side} image {got['image_ms']:.1f} ms, first token {got['ttft_ms']:.1f} ms;"
                )
            print(" ".join(line), flush=True)
    for key, label in (("image_ms", "image prefill"), ("ttft_ms", "time to first token")):
        ours, theirs = results["sipp"][key], results["mtmd-cli"][key]
        ratio = statistics.median(ours) / statistics.median(theirs)
        print(f"{label}: sipp {spread(ours, unit='ms')}; mtmd-cli {spread(theirs, unit='ms')}")
        print(f"  ratio sipp / mtmd-cli: {ratio:.2f}")


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "--child":
        sipp_side(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))
    else:
        main()
