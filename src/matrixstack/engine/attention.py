"""Paged attention in pure PyTorch: the batch metadata, cache writes and the attention kernel.

A step runs one flat batch of new tokens from several sequences. Sequence `i` owns the new tokens
`cu_seqlens_q[i]:cu_seqlens_q[i + 1]`; after the step it has `context_lens[i]` tokens, so its new tokens sit at
positions `context_lens[i] - new_tokens ... context_lens[i] - 1`. That covers a whole prompt (prefill), a chunk of
one (chunked prefill: causal inside the chunk, full attention to everything cached before it), and one or a few
tokens (decode, MTP-style verification) in the same batch.

The cache of one layer is split in fixed-size blocks: `[num_blocks, block_size, ...]`. Token position `p` of
sequence `i` lives at slot `block_tables[i, p // block_size] * block_size + p % block_size`; `slot_mapping` holds
that slot for each new token. New K/V (or MLA latents) are written before attention, so each sequence's keys are
gathered from its blocks alone.

The kernel is batched: one `scaled_dot_product_attention` call per group of sequences, whatever the batch size.
The sequences of a step fall in at most two groups, those with one new token (decodes) and those with more
(prefill chunks), so a pure decode or pure prefill step makes one call per layer and a mixed step two. A group
of S sequences with at most Q new tokens and L context tokens runs as one padded batch: queries [S, heads, Q, d],
keys and values gathered from the cache through a [S, kv_heads, L] slot index straight into the kernel's layout,
and a boolean mask [S, 1, Q, L] that is causal (query at position p sees keys 0..p), which also hides the keys
past each sequence's context; padded query rows see key 0 only (no empty softmax) and are dropped. The index
tensors and masks are built once per step (`AttentionMetadata.plan`) and shared by every layer. Splitting decodes
from prefill chunks keeps the padding small: a decode never pads to a chunk's length.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class AttentionGroup:
    """Sequences of one step that run as one padded attention batch (see the module docstring).

    `seq_ids` [S] are the sequences (indices into the step's metadata) and `q_len` the most new tokens of any of
    them (Q); `block_ids` [S * W] lists each sequence's first W cache blocks (W blocks cover the longest context
    of the group; 0 past a sequence's table: those keys are masked), so the group's keys are the L = W x
    block_size positions of those blocks; `mask` [S, 1, Q, L] says which key each query row sees (None: plain
    causal from the top left, for groups of whole prompts starting at position 0); `q_rows`
    [S * Q] picks each padded query row's token from the flat batch (None: the group is the whole batch, one
    token per sequence, in order); `out_rows` [T_g] picks each of the group's tokens from the padded output and
    `tokens` [T_g] says where it goes in the flat batch (None: the group is the whole batch, rows in order).
    """

    seq_ids: torch.Tensor
    q_len: int
    block_ids: torch.Tensor
    mask: torch.Tensor | None
    q_rows: torch.Tensor | None
    out_rows: torch.Tensor | None
    tokens: torch.Tensor | None

    @property
    def num_seqs(self) -> int:
        """Return the sequences in the group."""
        return self.seq_ids.numel()


@dataclass
class AttentionMetadata:
    """Where each sequence's new tokens are in the flat batch and where their keys live in the paged cache."""

    cu_seqlens_q: torch.Tensor  # int32 [num_seqs + 1]: offsets of each sequence's new tokens in the flat batch
    context_lens: torch.Tensor  # int32 [num_seqs]: tokens each sequence has after this step (cached + new)
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks]: KV block ids, -1 padded
    slot_mapping: torch.Tensor  # int64 [num_tokens]: flat KV slot (block * block_size + offset) per new token
    block_size: int
    _plan: list[AttentionGroup] | None = field(default=None, init=False, repr=False, compare=False)

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

    def plan(self) -> list[AttentionGroup]:
        """Return the step's attention groups (decodes, then prefill chunks; empty ones left out), built on the
        first call and shared by every layer."""
        if self._plan is None:
            self._plan = _plan_groups(self)
        return self._plan


MAX_DECODE_GROUPS = 3  # decodes split into at most this many groups of similar context length
MIN_SPLIT_SAVING_KEYS = 256  # a split must save this many padded key positions (one group's fixed cost, roughly)


def _split_by_length(ids: list[int], ctx: list[int], block_size: int) -> list[list[int]]:
    """Return `ids` (single-token sequences) as up to MAX_DECODE_GROUPS groups of similar context length.

    A group pads every sequence to its longest context, so one group over very different lengths reads mostly
    padding. Sequences are sorted by length (in blocks) and the group whose best cut saves the most padded key
    positions is cut, while a cut saves at least MIN_SPLIT_SAVING_KEYS; with no cut worth it, `[ids]` comes
    back unchanged (batch order). The number of groups stays bounded whatever the batch size.
    """
    blocks = {i: -(-ctx[i] // block_size) for i in ids}
    groups = [sorted(ids, key=blocks.__getitem__)]
    while len(groups) < MAX_DECODE_GROUPS:
        best = (0, 0, 0)  # (saved blocks, group, last index of the first part)
        for g, members in enumerate(groups):
            top = blocks[members[-1]]
            for j in range(len(members) - 1):
                saved = (j + 1) * (top - blocks[members[j]])
                if saved > best[0]:
                    best = (saved, g, j)
        saved, g, j = best
        if saved * block_size < MIN_SPLIT_SAVING_KEYS:
            break
        members = groups.pop(g)
        groups[g:g] = [members[: j + 1], members[j + 1 :]]
    return groups if len(groups) > 1 else [ids]


def _plan_groups(meta: AttentionMetadata) -> list[AttentionGroup]:
    """Split the step's sequences into decode groups (by context length) and one group of prefill chunks, and
    build each group's index tensors."""
    cu = meta.cu_seqlens_q.tolist()
    ctx = meta.context_lens.tolist()
    q_lens = [cu[i + 1] - cu[i] for i in range(meta.num_seqs)]
    decodes = [i for i, n in enumerate(q_lens) if n == 1]
    chunks = [i for i, n in enumerate(q_lens) if n > 1]
    groups = _split_by_length(decodes, ctx, meta.block_size) if decodes else []
    if chunks:
        groups.append(chunks)
    whole = len(groups) == 1 and sum(len(g) for g in groups) == meta.num_seqs
    return [_group(meta, ids, cu, ctx, q_lens, whole) for ids in groups]


def _group(
    meta: AttentionMetadata, ids: list[int], cu: list[int], ctx_lens: list[int], q_lens: list[int], whole: bool
) -> AttentionGroup:
    """Return the padded-batch description of the sequences `ids` (see `AttentionGroup`); `whole` says they are
    the whole batch, in order."""
    device = meta.slot_mapping.device
    seq_ids = torch.tensor(ids, dtype=torch.int64, device=device)
    ctx = meta.context_lens.to(torch.int64)
    tables = meta.block_tables
    if not whole:
        ctx, tables = ctx[seq_ids], tables[seq_ids]
    width = -(-max(ctx_lens[i] for i in ids) // meta.block_size)
    block_ids = tables[:, :width].to(torch.int64).clamp_min_(0).reshape(-1)
    key_pos = torch.arange(width * meta.block_size, device=device)
    q_len = max(q_lens[i] for i in ids)
    lens = torch.tensor([q_lens[i] for i in ids], dtype=torch.int64, device=device)
    row = torch.arange(q_len, device=device)
    real = row[None, :] < lens[:, None]  # [S, Q]: query rows that hold a token
    query_pos = torch.where(real, ctx[:, None] - lens[:, None] + row[None, :], 0)
    if q_len > 1 and all(ctx_lens[i] == q_lens[i] for i in ids):
        mask = None  # whole prompts from position 0: plain causal, which lets the kernel skip the upper triangle
    else:
        mask = (key_pos[None, None, :] <= query_pos[:, :, None])[:, None]
    if whole and q_len == 1:
        return AttentionGroup(seq_ids, q_len, block_ids, mask, None, None, None)
    starts = torch.tensor([cu[i] for i in ids], dtype=torch.int64, device=device)
    q_rows = (starts[:, None] + torch.where(real, row[None, :], 0)).reshape(-1)
    out_rows = real.reshape(-1).nonzero().squeeze(1)
    tokens = None if whole else q_rows[out_rows]
    return AttentionGroup(seq_ids, q_len, block_ids, mask, q_rows, out_rows, tokens)


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
    cache.view(-1, *cache.shape[2:])[slot_mapping] = values if values.dtype == cache.dtype else values.to(cache.dtype)


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """Return the first `length` cached entries of one sequence, [length, ...], from its blocks in order."""
    block_size = cache.shape[1]
    blocks = block_table[: -(-length // block_size)].long()
    return cache[blocks].flatten(0, 1)[:length]


class _Workspace(threading.local):
    """Per-thread scratch buffers for the gathered keys and values, reused from step to step and layer to layer.

    A fresh multi-megabyte tensor per gather costs a page fault per 4 KiB page on first touch, which on a VM can
    take longer than the gather itself; a kept buffer is faulted in once and grows (by 1.5x) when a step needs
    more. A layer's gathered keys are dead once its attention call returns, so one buffer per role serves all.
    """

    def __init__(self):
        self.buffers: dict[tuple, torch.Tensor] = {}

    def take(self, role: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Return a flat buffer of at least `numel` elements for `role`, as a [numel] view."""
        key = (role, dtype, device)
        buffer = self.buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            size = max(numel, int(1.5 * buffer.numel()) if buffer is not None else 0)
            buffer = torch.empty(size, dtype=dtype, device=device)
            self.buffers[key] = buffer
        return buffer[:numel]


_WORKSPACE = _Workspace()


def _gather(cache: torch.Tensor, group: AttentionGroup, role: str) -> torch.Tensor:
    """Return a group's cached entries of `cache` [num_blocks, block_size, kv_heads, d] as [S, kv_heads, L, d]
    (a strided view of whole blocks copied in token order), in the `role` scratch buffer (valid until the next
    gather for the same role on this thread)."""
    num_blocks, block_size, kv_heads, dim = cache.shape
    rows = cache.reshape(num_blocks, -1)
    out = _WORKSPACE.take(role, group.block_ids.numel() * rows.shape[1], cache.dtype, cache.device)
    torch.index_select(rows, 0, group.block_ids, out=out.view(-1, rows.shape[1]))
    return out.view(group.num_seqs, -1, kv_heads, dim).transpose(1, 2)


def paged_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor | None,
    meta: AttentionMetadata,
    scale: float,
    value_dim: int | None = None,
) -> torch.Tensor:
    """Return the attention output [num_tokens, heads, value_dim] of the new tokens over their cached context.

    `q` is [num_tokens, heads, dim]; `key_cache` is [num_blocks, block_size, kv_heads, dim] and `value_cache`
    [num_blocks, block_size, kv_heads, value_dim], with kv_heads dividing heads (grouped-query). With
    `value_cache` None the values are the first `value_dim` channels of the keys (MLA's latent), gathered once.
    The new tokens' keys and values must already be in the cache. One kernel call per group (module docstring).
    """
    groups = meta.plan()
    v_dim = value_cache.shape[-1] if value_cache is not None else value_dim
    heads, dim = q.shape[1], q.shape[2]
    out = None if len(groups) == 1 else q.new_empty(q.shape[0], heads, v_dim)
    for group in groups:
        keys = _gather(key_cache, group, "keys")
        values = keys[..., :v_dim] if value_cache is None else _gather(value_cache, group, "values")
        if group.q_rows is None:
            queries = q.reshape(group.num_seqs, 1, heads, dim)
        else:
            queries = q.index_select(0, group.q_rows).view(group.num_seqs, group.q_len, heads, dim)
        attended = F.scaled_dot_product_attention(
            queries.transpose(1, 2),
            keys,
            values,
            attn_mask=group.mask,
            is_causal=group.mask is None,
            scale=scale,
            enable_gqa=True,
        )
        rows = attended.transpose(1, 2).reshape(-1, heads, v_dim)  # [S * Q, heads, v_dim]
        if group.out_rows is not None:
            rows = rows.index_select(0, group.out_rows)
        if out is None:
            return rows
        out.index_copy_(0, group.tokens, rows)
    return out
