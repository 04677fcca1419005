"""matrix layer."""
