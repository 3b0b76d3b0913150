"""The in-process llama.cpp engine (needs the `local` extra)."""
