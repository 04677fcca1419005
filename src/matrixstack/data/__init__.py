"""Published results the project validates against, copied from shared/data with their sources."""
