"""Triton implementations, one module per kernel family, each with the signature of its `reference` twin."""
