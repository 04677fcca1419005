"""Paged KV cache bookkeeping: which cache blocks each sequence owns, and where each token's keys and values go.

The cache is `num_blocks` blocks of `block_size` token slots. A sequence's `block_table` lists its blocks in
order; token position p lives in slot `block_table[p // block_size] * block_size + p % block_size`. Blocks are
taken from a free list as a sequence grows (a prefill chunk or a decode token at a time) and returned when it
finishes, is aborted or is preempted. No prefix sharing: every block has exactly one owner.
"""

from __future__ import annotations

from collections import deque

from matrixstack.engine.sequence import Sequence
from matrixstack.errors import UserError


def blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    """Return how many blocks of `block_size` slots hold `num_tokens` tokens."""
    return -(-num_tokens // block_size)


def check_request_fits(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> None:
    """Raise UserError when a request can never run: no room for an output token, or prompt + max_tokens too long.

    The engine config guarantees the KV cache holds one max_model_len sequence, so this is also the block limit.
    """
    if num_prompt_tokens >= max_model_len:
        raise UserError(
            f"the prompt has {num_prompt_tokens} tokens but this model's context is max_model_len={max_model_len} "
            f"tokens for prompt and output together; shorten the prompt to fewer than {max_model_len} tokens"
        )
    if max_tokens is not None and num_prompt_tokens + max_tokens > max_model_len:
        raise UserError(
            f"the prompt has {num_prompt_tokens} tokens and max_tokens is {max_tokens}: "
            f"{num_prompt_tokens + max_tokens} tokens exceed this model's context of max_model_len={max_model_len} "
            f"tokens; lower max_tokens to at most {max_model_len - num_prompt_tokens} or shorten the prompt"
        )


class BlockManager:
    """A free list of KV cache blocks handed to sequences as they grow."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free_blocks: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        """Return the blocks no sequence owns."""
        return len(self._free_blocks)

    def num_missing_blocks(self, seq: Sequence, num_new_tokens: int) -> int:
        """Return the blocks `seq` still needs so its computed tokens plus `num_new_tokens` have slots."""
        needed = blocks_for_tokens(seq.num_computed_tokens + num_new_tokens, self.block_size)
        return max(needed - len(seq.block_table), 0)

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Return True when the free list has the blocks for `num_new_tokens` more computed tokens of `seq`."""
        return self.num_missing_blocks(seq, num_new_tokens) <= len(self._free_blocks)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Append blocks to `seq.block_table` so `num_new_tokens` more tokens have slots; check `can_allocate` first."""
        missing = self.num_missing_blocks(seq, num_new_tokens)
        if missing > len(self._free_blocks):
            raise RuntimeError(f"KV cache has {len(self._free_blocks)} free blocks; {seq!r} needs {missing}")
        seq.block_table.extend(self._free_blocks.popleft() for _ in range(missing))

    def free(self, seq: Sequence) -> None:
        """Return all of `seq`'s blocks to the free list and empty its block table."""
        self._free_blocks.extend(seq.block_table)
        seq.block_table = []

    def slots(self, seq: Sequence, start_position: int, num_tokens: int) -> list[int]:
        """Return the flat KV slot (block * block_size + offset) of each position in [start, start + num_tokens)."""
        size = self.block_size
        return [
            seq.block_table[p // size] * size + p % size for p in range(start_position, start_position + num_tokens)
        ]
