"""Dataset rows as training examples: token ids with the prompt masked, and batches of them.

A row is one of the two dataset shapes (adapt/datasets.py): `{"messages": [...]}` (the last message is the
assistant's answer, what is learned; the messages before it, the prompt) or `{"prompt", "completion"}` (the prompt
as one user message). The prompt is rendered with the engine's chat template and the generation prompt
(engine/tokenizer.py: `<|bos|>...<|assistant|>\\n`), exactly what the builtin engine's chat endpoint feeds the
model, and the completion is the answer's tokens followed by `<|eos|>`, where a served reply ends. Only completion
tokens count in the loss (the prompt's labels are masked), and an example longer than `max_len` tokens keeps its
first `max_len` tokens (a prompt that leaves no completion token is refused).

`batch(examples)` right-pads with `<|eos|>` to the longest example and returns ids [B, T] and labels [B, T] (the next
token to predict at each position, IGNORE where it is prompt or padding): causal attention never lets a real token
see the padding after it. `packed(examples)` lays the same tokens flat without padding, ids, positions and labels
[N] plus the `PackedBatch` (engine/model.py) that puts them back in the padded batch for attention only: training
runs every other op on the real tokens alone, and learns the same labels in the same order as `batch`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from matrixstack.engine.model import PackedBatch
from matrixstack.engine.tokenizer import Tokenizer
from matrixstack.errors import UserError

IGNORE = -100  # label of a position that is not learned (torch's cross_entropy ignore_index)


@dataclass(frozen=True)
class Example:
    """One training example: `ids` (prompt then completion), the first `prompt_len` of them the prompt; `answer`,
    the completion's text (for exact-match)."""

    ids: list[int]
    prompt_len: int
    answer: str

    @property
    def completion_tokens(self) -> int:
        """Return how many tokens the loss counts (the completion's)."""
        return len(self.ids) - self.prompt_len


def prompt_and_answer(row: Mapping[str, Any]) -> tuple[list[dict[str, str]], str]:
    """Return (chat messages of the prompt, answer text) of a dataset row; UserError for a row of neither shape or
    a chat that does not end with the assistant's answer."""
    if "messages" in row:
        messages = list(row["messages"])
        if not messages or messages[-1].get("role") != "assistant":
            raise UserError("a chat row must end with the assistant's message, the answer to learn")
        return messages[:-1], messages[-1].get("content", "")
    if "prompt" in row and "completion" in row:
        return [{"role": "user", "content": row["prompt"]}], row["completion"]
    raise UserError(f"dataset row with keys {sorted(row)} is neither a chat (messages) nor prompt/completion")


def prompt_ids(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Return the token ids of a chat prompt with the generation prompt, as the engine's chat endpoint makes them."""
    return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def to_example(tokenizer: Tokenizer, row: Mapping[str, Any], max_len: int) -> Example:
    """Return a row as an `Example` of at most `max_len` tokens; UserError when its prompt leaves no completion."""
    messages, answer = prompt_and_answer(row)
    prompt = prompt_ids(tokenizer, messages)
    ids = (prompt + tokenizer.encode(answer) + [tokenizer.eos_id])[:max_len]
    if len(prompt) >= len(ids):
        raise UserError(
            f"a prompt of {len(prompt)} tokens leaves no room for its answer within --max-len {max_len}; "
            "raise --max-len or shorten the row"
        )
    return Example(ids, len(prompt), answer)


def to_examples(tokenizer: Tokenizer, rows: list[Mapping[str, Any]], max_len: int) -> list[Example]:
    """Return every row as an `Example` (see `to_example`), in order."""
    return [to_example(tokenizer, row, max_len) for row in rows]


def batch(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (ids [B, T], labels [B, T]) of `examples` right-padded with `pad_id` (labels: the next token, IGNORE
    on prompt and padding positions)."""
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, : len(e.ids)] = torch.tensor(e.ids)
        # position t predicts token t + 1: the completion's tokens are predicted from positions prompt_len - 1 on
        labels[row, e.prompt_len - 1 : len(e.ids) - 1] = torch.tensor(e.ids[e.prompt_len :])
    return ids, labels


def packed(
    examples: list[Example], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, PackedBatch]:
    """Return (ids [N], positions [N], labels [N], layout) of `examples` laid flat, one after another, on `device`:
    the tokens and labels of `batch` without its padding, and the `PackedBatch` placing them in its rows."""
    width = max(len(e.ids) for e in examples)
    ids = [t for e in examples for t in e.ids]
    labels = [t for e in examples for t in [IGNORE] * (e.prompt_len - 1) + e.ids[e.prompt_len :] + [IGNORE]]
    positions = torch.cat([torch.arange(len(e.ids)) for e in examples])
    index = torch.cat([row * width + torch.arange(len(e.ids)) for row, e in enumerate(examples)])
    layout = PackedBatch(index.to(device), len(examples), width)
    return torch.tensor(ids, device=device), positions.to(device), torch.tensor(labels, device=device), layout
