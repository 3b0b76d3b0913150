"""Endpoints that speak HTTP: the Sipp gateway profile and model providers."""
