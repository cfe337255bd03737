"""ckptctl: list, inspect, diff, convert, prune and average ML checkpoint files."""

__version__ = "0.1.0"
