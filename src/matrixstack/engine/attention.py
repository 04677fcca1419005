"""Paged attention in pure PyTorch: the batch metadata, cache writes and the attention kernel.

A step runs one flat batch of new tokens from several sequences. Sequence `i` owns the new tokens
`cu_seqlens_q[i]:cu_seqlens_q[i + 1]`; after the step it has `context_lens[i]` tokens, so its new tokens sit at
positions `context_lens[i] - new_tokens ... context_lens[i] - 1`. That covers a whole prompt (prefill), a chunk of
one (chunked prefill: causal inside the chunk, full attention to everything cached before it), and one or a few
tokens (decode, MTP-style verification) in the same batch.

The cache of one layer is split in fixed-size blocks: `[num_blocks, block_size, ...]`. Token position `p` of
sequence `i` lives at slot `block_tables[i, p // block_size] * block_size + p % block_size`; `slot_mapping` holds
that slot for each new token. New K/V (or MLA latents) are written before attention, so each sequence's keys are
gathered from its blocks alone. The kernel loops over sequences and calls `scaled_dot_product_attention` with an
explicit causal mask: correct on CPU and CUDA, not fast.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """Where each sequence's new tokens are in the flat batch and where their keys live in the paged cache."""

    cu_seqlens_q: torch.Tensor  # int32 [num_seqs + 1]: offsets of each sequence's new tokens in the flat batch
    context_lens: torch.Tensor  # int32 [num_seqs]: tokens each sequence has after this step (cached + new)
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks]: KV block ids, -1 padded
    slot_mapping: torch.Tensor  # int64 [num_tokens]: flat KV slot (block * block_size + offset) per new token
    block_size: int

    @property
    def num_seqs(self) -> int:
        """Return the number of sequences in the batch."""
        return self.context_lens.numel()

    def positions(self) -> torch.Tensor:
        """Return the int64 position of every new token in its sequence, [num_tokens] (the RoPE positions)."""
        cu = self.cu_seqlens_q.tolist()
        ctx = self.context_lens.tolist()
        spans = [torch.arange(ctx[i] - (cu[i + 1] - cu[i]), ctx[i]) for i in range(self.num_seqs)]
        return torch.cat(spans).to(self.slot_mapping.device)


def build_metadata(
    block_tables: list[list[int]],
    context_lens: list[int],
    new_tokens: list[int],
    block_size: int,
    device: torch.device | str = "cpu",
) -> AttentionMetadata:
    """Return the metadata of a batch: sequence `i` has `new_tokens[i]` new tokens and `context_lens[i]` in all.

    `block_tables[i]` lists the cache blocks of sequence `i` in order; it must cover `context_lens[i]` tokens.
    """
    if not len(block_tables) == len(context_lens) == len(new_tokens):
        raise ValueError("block_tables, context_lens and new_tokens need one entry per sequence")
    slots: list[int] = []
    for table, total, new in zip(block_tables, context_lens, new_tokens, strict=True):
        if not 0 < new <= total or len(table) * block_size < total:
            raise ValueError(f"a sequence of {total} tokens ({new} new) does not fit {len(table)} blocks")
        slots.extend(table[p // block_size] * block_size + p % block_size for p in range(total - new, total))
    width = max(len(table) for table in block_tables)
    padded = [table + [-1] * (width - len(table)) for table in block_tables]
    offsets = [0]
    for new in new_tokens:
        offsets.append(offsets[-1] + new)
    return AttentionMetadata(
        cu_seqlens_q=torch.tensor(offsets, dtype=torch.int32, device=device),
        context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(padded, dtype=torch.int32, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        block_size=block_size,
    )


def write_cache(cache: torch.Tensor, slot_mapping: torch.Tensor, values: torch.Tensor) -> None:
    """Write `values` [num_tokens, ...] into `cache` [num_blocks, block_size, ...] at the flat slots, in place."""
    cache.view(-1, *cache.shape[2:])[slot_mapping] = values.to(cache.dtype)


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """Return the first `length` cached entries of one sequence, [length, ...], from its blocks in order."""
    block_size = cache.shape[1]
    blocks = block_table[: -(-length // block_size)].long()
    return cache[blocks].flatten(0, 1)[:length]


def paged_attention(
    q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Return the attention output [num_tokens, heads, value_dim] of the new tokens over their cached context.

    `q` is [num_tokens, heads, dim]; `key_cache` is [num_blocks, block_size, kv_heads, dim] and `value_cache`
    [num_blocks, block_size, kv_heads, value_dim], with kv_heads dividing heads (grouped-query). The new tokens'
    keys and values must already be in the cache.
    """
    out = q.new_empty(q.shape[0], q.shape[1], value_cache.shape[-1])
    cu = meta.cu_seqlens_q.tolist()
    ctx = meta.context_lens.tolist()
    for i in range(meta.num_seqs):
        start, end, length = cu[i], cu[i + 1], ctx[i]
        keys = gather_context(key_cache, meta.block_tables[i], length)
        values = gather_context(value_cache, meta.block_tables[i], length)
        query_pos = torch.arange(length - (end - start), length, device=q.device)
        mask = torch.arange(length, device=q.device)[None, :] <= query_pos[:, None]
        attended = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1),
            keys.transpose(0, 1),
            values.transpose(0, 1),
            attn_mask=mask,
            scale=scale,
            enable_gqa=True,
        )
        out[start:end] = attended.transpose(0, 1)
    return out
