"""perf layer."""
