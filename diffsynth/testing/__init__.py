"""Tiny random-weight model files in real formats, for tests and ``diffsynth demo``."""
