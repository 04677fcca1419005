"""adapt layer (floor 4): the work that makes L1 and L2 entries, on the matrix's database and the engine's model.

- `adapt.dataset_file`: a JSONL dataset read and validated line by line (chat or completion rows), its canonical
  bytes and sha256, and the datasets shipped with MatrixStack (`builtin/`);
- `adapt.dataset_store`: the `datasets` table beside the matrix tables, and where the files lie (by sha256);
- `adapt.datasets`: add, list, find, remove a tenant's datasets, and `load_split` (the rows a tune job trains on);
- `adapt.dataset_stats`: a dataset's token statistics with a base model's tokenizer and chat template.
- `adapt.lora`: LoRA on the engine's model for training (`attach_lora`: trainable A/B beside frozen linears, PEFT's
  initialisation), the adapter out of it (`adapter_of`) and its weights merged in for evaluation (`merged`);
- `adapt.examples`: dataset rows as token ids with the prompt masked (the engine's chat template), batches of them;
- `adapt.evaluate`: held-out loss and greedy exact-match;
- `adapt.spec`: `TuneSpec`, what a tune job is asked to do;
- `adapt.train`: the training loop, data-parallel over a slice's devices (torch.distributed), checkpointed and
  resumable to the same weights;
- `adapt.job_store`, `adapt.jobs`: tune jobs as rows in the matrix's database, each on a slice of a pool;
- `adapt.tune`: one job from its row to its adapter folder (`run_job`), and where adapters lie (`adapter_dir`).
"""
