"""Runnable examples; importable so tests can use them (examples.shapes.dataset, ...)."""
