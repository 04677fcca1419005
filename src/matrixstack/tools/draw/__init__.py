"""Pictures (matplotlib Agg, no GUI) of the lower floors' data: `fabric`, `matrix` and `perf`, one module each."""
