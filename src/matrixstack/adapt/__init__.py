"""adapt layer (floor 4): the work that makes L1 and L2 entries, on the matrix's database and the engine's model.

- `adapt.dataset_file`: a JSONL dataset read and validated line by line (chat or completion rows), its canonical
  bytes and sha256, and the datasets shipped with MatrixStack (`builtin/`);
- `adapt.dataset_store`: the `datasets` table beside the matrix tables, and where the files lie (by sha256);
- `adapt.datasets`: add, list, find, remove a tenant's datasets, and `load_split` (the rows a tune job trains on);
- `adapt.dataset_stats`: a dataset's token statistics with a base model's tokenizer and chat template.
"""
