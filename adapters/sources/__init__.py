"""Sources: collect events into the buffer."""
