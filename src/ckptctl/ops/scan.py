"""scan: classify the globals a pickle asks for (placeholder until the pickle readers land)."""

from __future__ import annotations


def classify(global_name: str) -> str:
    """'safe' | 'unknown' | 'dangerous' for a 'module.name' global."""
    return "unknown"
