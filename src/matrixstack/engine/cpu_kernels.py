"""A native CPU kernel for paged decode attention (numba), used by `engine.attention` where it applies.

Pure PyTorch attends over a paged cache by first copying each sequence's blocks into a padded batch (a gather)
and then running two batched GEMMs over it, so every key and value crosses memory three times. For decodes (one
query token per sequence) on a CPU that is most of the cost: `decode_attention` reads each key and value once,
straight from the blocks, with the query heads that share a key head computed together and an exact (two-pass)
float32 softmax (in PyTorch, between the kernel's two passes), no padding. On tiny-moe's decode batches (32 sequences,
64..400-token contexts, one core) it took 115 / 495 / 1,746 us against 260 / 835 / 3,008 us for the gather-and-bmm
path (that was one pass with a scalar `exp`; the softmax in PyTorch took ~10% off again). Long contexts run the
two passes on torch's thread count (`PARALLEL_MIN_KEYS`).

It applies to float32 CPU tensors when numba is importable, and `MATRIXSTACK_CPU_KERNELS=0` turns it off (the
tests compare both paths). The first call compiles it (about a second; numba caches the machine code next to
this file). Everything else, and every other device or dtype, takes the PyTorch path.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

try:
    import numba
except ImportError:  # an optional speed-up: the PyTorch path is complete without it
    numba = None

ENV_SWITCH = "MATRIXSTACK_CPU_KERNELS"
# A step whose cached keys (summed over sequences and key heads) reach this many runs the kernels on torch's thread
# count (numba `prange` over (sequence, key head)); fewer run on one thread. Served over HTTP on 2 cores, workload B
# of bench/engine_vs_vllm.py (contexts 512-1664) went 224-240 -> 254-277 tok/s in parallel, while workload A
# (contexts 16-384: a few thousand keys a step) lost 5-10%: waking the second thread costs more than it saves.
PARALLEL_MIN_KEYS = 32768


def enabled(q: torch.Tensor, cache: torch.Tensor) -> bool:
    """Return whether `decode_attention` runs for these tensors: numba present, switch not "0", float32 CPU
    tensors, and no autograd."""
    return (
        numba is not None
        and os.environ.get(ENV_SWITCH, "1") != "0"
        and q.device.type == "cpu"
        and q.dtype == torch.float32
        and cache.dtype == torch.float32
        and not torch.is_grad_enabled()
    )


def decode_attention(
    queries: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Return the attention [S, heads, v_dim] of one query token per sequence, `queries` [S, heads, d], over the
    first `context_lens[s]` cached positions of sequence s, read from the blocks `block_tables` [S, W] (int32) of
    `key_cache` [kv_heads, num_blocks, block_size, d] and `value_cache` [kv_heads, num_blocks, block_size, v_dim]
    (query head h reads key head h // (heads / kv_heads)).

    Three passes: the scaled scores (numba) into a [S, kv_heads, g, W x block_size] buffer that is -inf past each
    context, their softmax in PyTorch (a vectorised exp, where numba calls the scalar one per score), then the
    probability-weighted values (numba)."""
    seqs, heads, dim = queries.shape
    kv_heads, v_dim = key_cache.shape[0], value_cache.shape[-1]
    group = heads // kv_heads
    grouped = queries.contiguous().view(seqs, kv_heads, group, dim)
    scores = torch.full((seqs, kv_heads, group, block_tables.shape[1] * key_cache.shape[2]), -math.inf)
    tables, lens = block_tables.numpy(), context_lens.numpy()
    threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    parallel = threads > 1 and int(lens.sum()) * kv_heads >= PARALLEL_MIN_KEYS
    if parallel:
        numba.set_num_threads(threads)
    scores_kernel, values_kernel = (_scores_parallel, _values_parallel) if parallel else (_scores, _values)
    scores_kernel(grouped.numpy(), key_cache.numpy(), tables, lens, np.float32(scale), scores.numpy())
    probs = scores.softmax(-1)
    out = torch.empty(seqs, kv_heads, group, v_dim, dtype=torch.float32)
    values_kernel(probs.numpy(), value_cache.numpy(), tables, lens, out.numpy())
    return out.view(seqs, heads, v_dim)


def _scores_kernel(q, k_cache, block_tables, context_lens, scale, scores):  # pragma: no cover
    """scores[s, h, j, p] = scale * q[s, h, j] . K[s, h, p] for sequence s's cached positions p (the rest of
    `scores` is left as it is). q [S, kv_heads, g, d]; k_cache [kv_heads, blocks, block_size, d]; block_tables
    [S, W]; context_lens [S]. Compiled by numba (nopython, fastmath: the dot products vectorise)."""
    num_seqs, kv_heads, group, dim = q.shape
    block_size = k_cache.shape[2]
    for i in numba.prange(num_seqs * kv_heads):
        s, h = i // kv_heads, i % kv_heads
        for p in range(context_lens[s]):
            key = k_cache[h, block_tables[s, p // block_size], p % block_size]
            for j in range(group):
                total = np.float32(0.0)
                for c in range(dim):
                    total += q[s, h, j, c] * key[c]
                scores[s, h, j, p] = total * scale


def _values_kernel(probs, v_cache, block_tables, context_lens, out):  # pragma: no cover
    """out[s, h, j] = sum over sequence s's cached positions p of probs[s, h, j, p] V[s, h, p]. probs [S,
    kv_heads, g, W x block_size]; v_cache [kv_heads, blocks, block_size, dv]; out [S, kv_heads, g, dv].
    Compiled by numba (the value sums vectorise)."""
    num_seqs, kv_heads, group, v_dim = out.shape
    block_size = v_cache.shape[2]
    for i in numba.prange(num_seqs * kv_heads):
        s, h = i // kv_heads, i % kv_heads
        acc = np.zeros((group, v_dim), dtype=np.float32)
        for p in range(context_lens[s]):
            value = v_cache[h, block_tables[s, p // block_size], p % block_size]
            for j in range(group):
                weight = probs[s, h, j, p]
                for c in range(v_dim):
                    acc[j, c] += weight * value[c]
        out[s, h] = acc


def _compile(kernel, parallel: bool):
    """Return `kernel` compiled by numba (cached next to this file; `parallel`: its `prange` loop spread over
    numba's threads), or None without numba."""
    if numba is None:
        return None
    return numba.njit(cache=True, fastmath=True, boundscheck=False, parallel=parallel)(kernel)


_scores, _values = _compile(_scores_kernel, False), _compile(_values_kernel, False)
_scores_parallel, _values_parallel = _compile(_scores_kernel, True), _compile(_values_kernel, True)
