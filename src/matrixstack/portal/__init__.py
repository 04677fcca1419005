"""portal layer."""
