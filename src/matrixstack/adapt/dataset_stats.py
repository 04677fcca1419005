"""A dataset's token statistics with a base model's tokenizer, and the texts a row becomes for that model.

`row_texts(row, tokenizer)` returns (prompt, completion) as the model sees them: a chat row's prompt is its messages
but the last in the tokenizer's chat template, ending with the assistant's turn opened (`<|assistant|>\\n`), and its
completion is the last (assistant) message's content ended by `<|eos|>`; a completion row's prompt is `<|bos|>` +
its prompt, its completion the completion + `<|eos|>`. A tune job learns the completion's tokens given the prompt's.

`token_stats` counts them for every row: prompt, completion and total tokens, and the length of a row (its total
tokens) at the 50th, 90th and 99th percentiles and its maximum (nearest-rank: each is the length of a real row).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from matrixstack.engine import TOKENIZER_FILE, weights_or_packaged
from matrixstack.engine.tokenizer import BOS, EOS, Tokenizer

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class TokenStats:
    """Token counts of a dataset under one base model's tokenizer; `*_lengths` are per row, in row order."""

    base: str
    rows: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    length_percentiles: dict[str, int]  # p50, p90, p99, max of a row's total tokens
    prompt_lengths: list[int]
    completion_lengths: list[int]

    def view(self) -> dict[str, Any]:
        """Return the statistics as a JSON-ready dict, without the per-row lengths."""
        data = asdict(self)
        del data["prompt_lengths"], data["completion_lengths"]
        return data


def base_tokenizer(base: str) -> Tokenizer:
    """Return the tokenizer of the base model `base` (tiny-moe's packaged one, or a registered model's); UserError
    when the model ships none or its tokenizer lacks MatrixStack's special tokens."""
    how = "--base takes a model with weights and a tokenizer: tiny-moe, or one registered with `matrixstack model add`"
    folder = weights_or_packaged(base, None, how)
    return Tokenizer.from_file(folder / TOKENIZER_FILE)


def row_texts(row: dict[str, Any], tokenizer: Tokenizer) -> tuple[str, str]:
    """Return (prompt text, completion text) of a validated row as the model sees them (see the module docstring)."""
    if "messages" in row:
        *context, reply = row["messages"]
        return tokenizer.apply_chat_template(context, add_generation_prompt=True), reply["content"] + EOS
    return BOS + row["prompt"], row["completion"] + EOS


def token_stats(rows: list[dict[str, Any]], tokenizer: Tokenizer, base: str) -> TokenStats:
    """Return the token statistics of validated `rows` with `tokenizer`, the tokenizer of the model `base`."""
    texts = [row_texts(row, tokenizer) for row in rows]
    prompt_lengths = _lengths([prompt for prompt, _ in texts], tokenizer)
    completion_lengths = _lengths([completion for _, completion in texts], tokenizer)
    totals = np.add(prompt_lengths, completion_lengths)
    percentiles = {f"p{p}": int(np.percentile(totals, p, method="inverted_cdf")) for p in PERCENTILES}
    return TokenStats(
        base=base, rows=len(rows), prompt_tokens=sum(prompt_lengths), completion_tokens=sum(completion_lengths),
        total_tokens=int(totals.sum()), length_percentiles={**percentiles, "max": int(totals.max())},
        prompt_lengths=prompt_lengths, completion_lengths=completion_lengths,
    )  # fmt: skip


def _lengths(texts: list[str], tokenizer: Tokenizer) -> list[int]:
    """Return the token count of each text (special-token strings count as their one token)."""
    return [len(encoding.ids) for encoding in tokenizer.backend.encode_batch(texts, add_special_tokens=False)]
