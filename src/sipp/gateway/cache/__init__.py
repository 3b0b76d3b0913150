"""The gateway's response cache: keys, stores and the pipeline stage (see `exact`).

Kept free of imports so `config` can read `cache.config` without pulling in the stage.
"""
