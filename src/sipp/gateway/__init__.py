"""The first-party gateway application: TOML config today; the server builds on it."""
