"""Pictures (matplotlib Agg, no GUI) of the lower floors' data: `fabric`, `matrix`, `perf` and `adapt` (a dataset's
row lengths), one module each."""
