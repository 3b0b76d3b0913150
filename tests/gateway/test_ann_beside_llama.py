"""The ANN library and llama.cpp in one process, in the order a gateway restart can take:
the semantic cache's restore imports usearch while local targets are still loading.
usearch carries a C++ runtime of its own; imported first, it used to make every later
llama.cpp model load fail ("error loading model vocabulary: std::bad_cast"). A fresh
interpreter each time: in this test process a model has long been loaded already."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import sys
from sipp import LocalModelDescriptor, SippClient, SippTextOptions
from sipp.gateway.cache.vector_index import VectorIndex, ann_available
import numpy as np

assert ann_available()  # imports usearch before any model is loaded
index = VectorIndex(8, ann_min_size=4, start_build=lambda job: job())  # builds at once
index.add_many(np.arange(6), np.eye(8, dtype=np.float32)[:6])
assert index.uses_ann and index.search(np.eye(8, dtype=np.float32)[2], k=1)[0].key == 2
with SippClient() as client:
    ref = client.add("chat", LocalModelDescriptor(sys.argv[1]))
    options = SippTextOptions(max_tokens=4, temperature=0)
    response = client.query("The sky is", endpoint=ref, options=options).result()
    assert response.usage is not None and response.usage.output_tokens >= 1
print("ok")
"""


def test_a_model_loads_after_the_ann_library_was_imported(smollm_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(smollm_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "ok"
