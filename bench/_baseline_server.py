"""Start `python -m llama_cpp.server` with llama.cpp's extra buffer types off.

llama-cpp-python's server has no switch for `use_extra_bufts`, and with it on
the first decode crashes on AMX CPUs (SIGSEGV in ggml_backend_amx_mul_mat), as
sipp avoids by default. This launcher patches the default model params the
server's `Llama` class reads, then runs the server's own entry point with the
command-line arguments unchanged.
"""

from __future__ import annotations

import llama_cpp.llama_cpp as low_level
from llama_cpp.server.__main__ import main

_default_params = low_level.llama_model_default_params


def _params_without_extra_bufts():  # type: ignore[no-untyped-def]
    params = _default_params()
    params.use_extra_bufts = False
    return params


low_level.llama_model_default_params = _params_without_extra_bufts

if __name__ == "__main__":
    main()
