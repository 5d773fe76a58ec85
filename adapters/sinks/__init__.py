"""Sinks: deliver batches to the central side."""
