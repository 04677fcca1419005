"""fabric layer."""
