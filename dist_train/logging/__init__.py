"""Rank-aware console logging, metric sinks, progress."""
