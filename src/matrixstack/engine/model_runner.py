"""The model runner: turns one scheduled step into sampled tokens, owning the model, its KV cache and its LoRA
adapter slots (`lora`, `engine.lora_slots`: each step runs every sequence through the adapter in its slot)."""

from __future__ import annotations

import torch

from matrixstack.engine.attention import AttentionMetadata
from matrixstack.engine.config import EngineConfig
from matrixstack.engine.lora_slots import LoraSlots
from matrixstack.engine.model import MoETransformer
from matrixstack.engine.sampler import make_generator, sample
from matrixstack.engine.scheduler import SchedulerOutput


class ModelRunner:
    """Runs the model over the paged KV cache for a `SchedulerOutput` and samples the next tokens."""

    def __init__(self, model: MoETransformer, config: EngineConfig):
        self.model = model
        self.config = config
        self.device = model.embed_tokens.weight.device
        self.kv_cache = model.allocate_kv_cache(config.num_kv_blocks, config.block_size)
        self.lora = LoraSlots(model, config)

    def metadata(self, out: SchedulerOutput) -> AttentionMetadata:
        """Return the attention metadata of a step, as tensors on the model's device."""

        def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=self.device)

        return AttentionMetadata(
            cu_seqlens_q=tensor(out.cu_seqlens_q, torch.int32),
            context_lens=tensor(out.context_lens, torch.int32),
            block_tables=tensor(out.block_tables, torch.int32),
            slot_mapping=tensor(out.slot_mapping, torch.int64),
            block_size=self.config.block_size,
        )

    @torch.inference_mode()
    def hidden(self, out: SchedulerOutput) -> torch.Tensor:
        """Return the hidden states [T, H] of the step's flat batch (writing its KV to the cache), each sequence's
        tokens through its adapter slot (`out.lora_slots`)."""
        input_ids = torch.tensor(out.input_ids, dtype=torch.int64, device=self.device)
        positions = torch.tensor(out.positions, dtype=torch.int64, device=self.device)
        lora = self.lora.batch(out.lora_slots, out.num_new_tokens)
        return self.model(input_ids, positions, self.metadata(out), self.kv_cache, lora)

    @torch.inference_mode()
    def run_logits(self, out: SchedulerOutput) -> torch.Tensor:
        """Return the float32 logits [samples, vocab] of the step's sampled rows (for comparisons and tests)."""
        rows = torch.tensor(out.logits_indices, dtype=torch.int64, device=self.device)
        return self.model.compute_logits(self.hidden(out)[rows])

    @torch.inference_mode()
    def run(self, out: SchedulerOutput) -> list[int]:
        """Return one sampled token per `out.sample_seqs` entry (an empty list when nothing is sampled)."""
        hidden = self.hidden(out)
        if not out.sample_seqs:
            return []
        rows = torch.tensor(out.logits_indices, dtype=torch.int64, device=self.device)
        logits = self.model.compute_logits(hidden[rows])
        for seq in out.sample_seqs:
            if seq.generator is None and seq.params.seed is not None:
                seq.generator = make_generator(seq.params.seed, self.device)
        tokens = sample(logits, [s.params for s in out.sample_seqs], [s.generator for s in out.sample_seqs])
        return tokens.tolist()
