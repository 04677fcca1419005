"""Paged attention in pure PyTorch: the batch metadata, cache writes and the attention kernel.

A step runs one flat batch of new tokens from several sequences. Sequence `i` owns the new tokens
`cu_seqlens_q[i]:cu_seqlens_q[i + 1]`; after the step it has `context_lens[i]` tokens, so its new tokens sit at
positions `context_lens[i] - new_tokens ... context_lens[i] - 1`. That covers a whole prompt (prefill), a chunk of
one (chunked prefill: causal inside the chunk, full attention to everything cached before it), and one or a few
tokens (decode, MTP-style verification) in the same batch.

The cache of one layer is split in fixed-size blocks, head-major: `[kv_heads, num_blocks, block_size, d]` (MLA's
latent is one "head"). Token position `p` of sequence `i` lives at slot `block_tables[i, p // block_size] *
block_size + p % block_size` of every head; `slot_mapping` holds that slot for each new token. New K/V (or MLA
latents) are written before attention, so each sequence's keys are gathered from its blocks alone.

The kernel is batched: a constant number of kernel calls per layer, whatever the batch size. A step's sequences
are split into groups (`AttentionMetadata.plan`, built once per step and shared by every layer): those with one
new token (decodes) and those with more (prefill chunks) never share a group, so a decode never pads to a chunk's
length; and each kind is cut into at most MAX_GROUPS groups of similar lengths, where a cut saves more padding
than a group costs (`_split_by_length`). A pure decode step with similar contexts makes one group per layer. A
group of S sequences with at most Q new tokens and L context tokens (whole blocks) runs as one padded batch: keys
and values copied from the cache a whole block at a time (one `index_select` per head, into a per-thread scratch
buffer reused from layer to layer and step to step, so no fresh multi-megabyte tensor is page-faulted in every
time) as contiguous [kv_heads, S, L, d]. Padding reads block 0 (finite) and is masked.
- A decode group (Q = 1) on a CPU in float32 runs the native kernel of `engine.cpu_kernels`, which reads the
  blocks in place (no gather, no padding; 1.7-2.3x faster again). Elsewhere it is two batched GEMMs and a float32
  softmax (`_decode_attention`): the query heads that share a key head are the rows of one small GEMM per (key
  head, sequence), and `hidden_keys` [1, S, 1, L] masks the keys past each context. (The CPU flash kernel of
  `scaled_dot_product_attention`, one query row at a time, was 1.4-1.7x slower than that on tiny-moe's decode
  batches.)
- A chunk group runs `scaled_dot_product_attention` on queries [S, heads, Q, d] with a boolean mask [S, 1, Q, L]
  that is causal (query at position p sees keys 0..p) and hides the keys past each context. Padded query rows
  see key 0 only (no empty softmax) and are dropped. A group of whole prompts from position 0 needs no mask:
  plain `is_causal`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from matrixstack.engine import cpu_kernels


@dataclass
class AttentionGroup:
    """Sequences of one step that run as one padded attention batch (see the module docstring).

    `seq_ids` [S] are the sequences (indices into the step's metadata) and `q_len` the most new tokens of any of
    them (Q); `block_ids` [S * W] lists each sequence's first W cache blocks (W blocks cover the longest context
    of the group; 0 past a sequence's table: those keys are masked), so the group's keys are the L = W x
    block_size positions of those blocks; for a chunk group (Q > 1) `mask` [S, 1, Q, L] says which key each query
    row sees (None: plain causal from the top left, for groups of whole prompts starting at position 0); for a
    decode group (Q = 1) `hidden_keys` [1, S, 1, L] is True at the keys past each context, and `block_table`
    [S, W] (int32, -1 past a table) and `context_lens` [S] (int32) feed the native kernel; `q_rows` [S * Q] picks each
    padded query row's token from the flat batch (None: the group is the whole batch, one token per sequence, in
    order); `out_rows` [T_g] picks each of the group's tokens from the padded output (None: one token per
    sequence, so every padded row is a token) and `tokens` [T_g] says where it goes in the flat batch (None: the
    group is the whole batch, rows in order).
    """

    seq_ids: torch.Tensor
    q_len: int
    block_ids: torch.Tensor
    mask: torch.Tensor | None
    hidden_keys: torch.Tensor | None
    block_table: torch.Tensor | None
    context_lens: torch.Tensor | None
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


MAX_GROUPS = 4  # decodes, and prefill chunks, are each split into at most this many groups of similar lengths
MIN_SPLIT_SAVING_KEYS = 512  # a decode split must save this many padded key positions (about a group's cost)
MIN_SPLIT_SAVING_PAIRS = 32768  # a chunk split must save this many padded (query, key) pairs


def _split_by_length(
    ids: list[int], ctx: list[int], block_size: int, q_lens: list[int] | None = None, min_saving: int = 0
) -> list[list[int]]:
    """Return `ids` as up to MAX_GROUPS groups of similar lengths.

    A group pads every sequence to its longest context L (whole blocks) and, for chunks, to its most new tokens
    Q, so it costs (sequences x Q x L); one group over very different lengths computes mostly padding.
    Sequences are sorted by context and the group whose best cut saves the most is cut, while a cut saves at
    least `min_saving` (default MIN_SPLIT_SAVING_KEYS with single-token sequences, i.e. `q_lens` None, else
    MIN_SPLIT_SAVING_PAIRS); with no cut worth it, `[ids]` comes back unchanged (batch order). The number of
    groups stays bounded whatever the batch size.
    """
    length = {i: -(-ctx[i] // block_size) * block_size for i in ids}
    queries = {i: 1 if q_lens is None else q_lens[i] for i in ids}
    min_saving = min_saving or (MIN_SPLIT_SAVING_KEYS if q_lens is None else MIN_SPLIT_SAVING_PAIRS)
    groups = [sorted(ids, key=length.__getitem__)]
    while len(groups) < MAX_GROUPS:
        best = (0, 0, 0)  # (saved, group, size of the first part)
        for g, members in enumerate(groups):
            n = len(members)
            suffix_q = [0] * (n + 1)
            for j in range(n - 1, -1, -1):
                suffix_q[j] = max(suffix_q[j + 1], queries[members[j]])
            whole = n * suffix_q[0] * length[members[-1]]
            prefix_q = 0
            for j in range(1, n):
                prefix_q = max(prefix_q, queries[members[j - 1]])
                cost = j * prefix_q * length[members[j - 1]] + (n - j) * suffix_q[j] * length[members[-1]]
                if whole - cost > best[0]:
                    best = (whole - cost, g, j)
        saved, g, j = best
        if saved < min_saving:
            break
        members = groups.pop(g)
        groups[g:g] = [members[:j], members[j:]]
    return groups if len(groups) > 1 else [ids]


def _plan_groups(meta: AttentionMetadata) -> list[AttentionGroup]:
    """Split the step's sequences into decode groups and prefill-chunk groups, each by length, and build each
    group's index tensors."""
    cu = meta.cu_seqlens_q.tolist()
    ctx = meta.context_lens.tolist()
    q_lens = [cu[i + 1] - cu[i] for i in range(meta.num_seqs)]
    decodes = [i for i, n in enumerate(q_lens) if n == 1]
    chunks = [i for i, n in enumerate(q_lens) if n > 1]
    groups = _split_by_length(decodes, ctx, meta.block_size) if decodes else []
    if chunks:
        groups += _split_by_length(chunks, ctx, meta.block_size, q_lens)
    whole = len(groups) == 1
    return [_group(meta, ids, cu, ctx, q_lens, whole) for ids in groups]


def _group(
    meta: AttentionMetadata, ids: list[int], cu: list[int], ctx_lens: list[int], q_lens: list[int], whole: bool
) -> AttentionGroup:
    """Return the padded-batch description of the sequences `ids` (see `AttentionGroup`); `whole` says they are
    the whole batch, in order."""
    device = meta.slot_mapping.device
    seq_ids = torch.tensor(ids, dtype=torch.int64, device=device)
    tables = meta.block_tables if whole else meta.block_tables[seq_ids]
    width = -(-max(ctx_lens[i] for i in ids) // meta.block_size)
    block_ids = tables[:, :width].to(torch.int64).clamp_min_(0).reshape(-1)
    key_pos = torch.arange(width * meta.block_size, device=device)
    q_len = max(q_lens[i] for i in ids)
    if q_len == 1:  # one token per sequence, at position context - 1: it sees keys 0 .. context - 1
        ctx = torch.tensor([ctx_lens[i] for i in ids], dtype=torch.int64, device=device)
        hidden = (key_pos[None, :] >= ctx[:, None])[None, :, None, :]
        table = tables[:, :width].contiguous()
        lens = ctx.to(torch.int32)
        if whole:
            return AttentionGroup(seq_ids, 1, block_ids, None, hidden, table, lens, None, None, None)
        starts = torch.tensor([cu[i] for i in ids], dtype=torch.int64, device=device)
        return AttentionGroup(seq_ids, 1, block_ids, None, hidden, table, lens, starts, None, starts)  # rows: tokens
    ctx = torch.tensor([ctx_lens[i] for i in ids], dtype=torch.int64, device=device)
    lens = torch.tensor([q_lens[i] for i in ids], dtype=torch.int64, device=device)
    row = torch.arange(q_len, device=device)
    real = row[None, :] < lens[:, None]  # [S, Q]: query rows that hold a token
    if all(ctx_lens[i] == q_lens[i] for i in ids):
        mask = None  # whole prompts from position 0: plain causal (no mask to build or read)
    else:
        query_pos = torch.where(real, ctx[:, None] - lens[:, None] + row[None, :], 0)
        mask = (key_pos[None, None, :] <= query_pos[:, :, None])[:, None]
    starts = torch.tensor([cu[i] for i in ids], dtype=torch.int64, device=device)
    q_rows = (starts[:, None] + torch.where(real, row[None, :], 0)).reshape(-1)
    out_rows = real.reshape(-1).nonzero().squeeze(1)
    tokens = None if whole else q_rows[out_rows]
    return AttentionGroup(seq_ids, q_len, block_ids, mask, None, None, None, q_rows, out_rows, tokens)


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
    """Write `values` [num_tokens, kv_heads, d] into `cache` [kv_heads, num_blocks, block_size, d] at the flat
    slots, in place."""
    values = values if values.dtype == cache.dtype else values.to(cache.dtype)
    cache.view(cache.shape[0], -1, cache.shape[-1])[:, slot_mapping] = values.transpose(0, 1)


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
            with torch.inference_mode(False):  # a normal tensor: writable inside and outside inference mode
                buffer = torch.empty(size, dtype=dtype, device=device)
            self.buffers[key] = buffer
        return buffer[:numel]


_WORKSPACE = _Workspace()


def _gather(cache: torch.Tensor, group: AttentionGroup, role: str) -> torch.Tensor:
    """Return a group's cached entries of `cache` [kv_heads, num_blocks, block_size, d] as [kv_heads, S, L, d]
    (contiguous: whole blocks copied in token order), in the `role` scratch buffer (valid until the next gather
    for the same role on this thread)."""
    kv_heads, num_blocks, block_size, dim = cache.shape
    rows = cache.view(kv_heads, num_blocks, block_size * dim)
    out = _WORKSPACE.take(role, kv_heads * group.block_ids.numel() * rows.shape[-1], cache.dtype, cache.device)
    out = out.view(kv_heads, -1, rows.shape[-1])
    for head in range(kv_heads):  # row gathers of dim 0: they parallelise, one over dim 1 does not
        torch.index_select(rows[head], 0, group.block_ids, out=out[head])
    return out.view(kv_heads, group.num_seqs, -1, dim)


def _decode_attention(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, hidden: torch.Tensor, scale):
    """Return attention [S, heads, v_dim] of one query token per sequence, `queries` [S, heads, d], over `keys`
    [kv_heads, S, L, d] and `values` [kv_heads, S, L, v_dim], with `hidden` [1, S, 1, L] True at padded keys.

    The query heads that share a key head become the rows of one small GEMM per (key head, sequence), so the
    whole group is two batched GEMMs and a softmax (float32), with no key or value copied per query head."""
    kv_heads, seqs = keys.shape[0], keys.shape[1]
    grouped = queries.view(seqs, kv_heads, -1, queries.shape[-1]).transpose(0, 1)  # [kv_heads, S, g, d]
    scores = torch.matmul(grouped, keys.transpose(-1, -2)).float().mul_(scale).masked_fill_(hidden, float("-inf"))
    probs = scores.softmax(-1).to(values.dtype)
    return torch.matmul(probs, values).transpose(0, 1).reshape(seqs, -1, values.shape[-1])


def paged_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor | None,
    meta: AttentionMetadata,
    scale: float,
    value_dim: int | None = None,
) -> torch.Tensor:
    """Return the attention output [num_tokens, heads, value_dim] of the new tokens over their cached context.

    `q` is [num_tokens, heads, dim]; `key_cache` is [kv_heads, num_blocks, block_size, dim] and `value_cache`
    [kv_heads, num_blocks, block_size, value_dim], with kv_heads dividing heads (grouped-query: query head h reads
    key head h // (heads / kv_heads)). With `value_cache` None the values are the first `value_dim` channels of the
    keys (MLA's latent), gathered once. The new tokens' keys and values must already be in the cache. One kernel
    call per group (module docstring).
    """
    groups = meta.plan()
    v_dim = value_cache.shape[-1] if value_cache is not None else value_dim
    heads, dim = q.shape[1], q.shape[2]
    out = None if len(groups) == 1 else q.new_empty(q.shape[0], heads, v_dim)
    native = cpu_kernels.enabled(q, key_cache)
    for group in groups:
        if group.q_len == 1 and native:  # reads the blocks in place: no gather
            queries = q if group.q_rows is None else q.index_select(0, group.q_rows)
            values = key_cache[..., :v_dim] if value_cache is None else value_cache
            rows = cpu_kernels.decode_attention(
                queries, key_cache, values, group.block_table, group.context_lens, scale
            )
            if out is None:
                return rows
            out.index_copy_(0, group.tokens, rows)
            continue
        keys = _gather(key_cache, group, "keys")
        values = keys[..., :v_dim] if value_cache is None else _gather(value_cache, group, "values")
        if group.q_len == 1:
            queries = q if group.q_rows is None else q.index_select(0, group.q_rows)
            rows = _decode_attention(queries, keys, values, group.hidden_keys, scale)
        else:
            queries = q.index_select(0, group.q_rows).view(group.num_seqs, group.q_len, heads, dim)
            attended = F.scaled_dot_product_attention(
                queries.transpose(1, 2),
                keys.transpose(0, 1),
                values.transpose(0, 1),
                attn_mask=group.mask,
                is_causal=group.mask is None,
                scale=scale,
                enable_gqa=True,
            )
            rows = attended.transpose(1, 2).reshape(-1, heads, v_dim)  # [S * Q, heads, v_dim]
            rows = rows.index_select(0, group.out_rows)
        if out is None:
            return rows
        out.index_copy_(0, group.tokens, rows)
    return out
