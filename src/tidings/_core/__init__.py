"""The framework- and broker-agnostic core of tidings."""
