"""Resilient upstreams: pools of deployments behind one target, retries and fallbacks
with a commit point, and a circuit breaker per deployment (see `execute`)."""
