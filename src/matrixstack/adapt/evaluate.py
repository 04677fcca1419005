"""Evaluation of a model with its adapter on held-out examples: the loss and greedy exact-match.

`evaluate(model, wrappers, tokenizer, examples)` runs with the adapter merged into the base weights
(`lora.merged`), without gradients, so it is the model the engine would serve: `loss` is the mean cross-entropy
over the completion tokens (prompt masked, as in training), `exact_match` the share of examples whose greedy answer
(engine/model.py's `greedy_generate` over the chat prompt, up to the answer's length plus one token, cut at
`<|eos|>`) equals the expected answer once surrounding whitespace is stripped. With no examples there is nothing to
measure: both are None.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from matrixstack.adapt.examples import IGNORE, Example, batch
from matrixstack.adapt.lora import LoraLinear, merged
from matrixstack.engine.model import MoETransformer, greedy_generate
from matrixstack.engine.tokenizer import Tokenizer

EVAL_BATCH = 8  # examples per loss forward pass


def heldout_loss(model: MoETransformer, examples: list[Example], pad_id: int) -> float:
    """Return the mean cross-entropy over the completion tokens of `examples` (run without gradients)."""
    device = model.embed_tokens.weight.device
    total, tokens = 0.0, 0
    for start in range(0, len(examples), EVAL_BATCH):
        ids, labels = batch(examples[start : start + EVAL_BATCH], pad_id)
        logits = model.reference_forward(ids.to(device))
        total += float(F.cross_entropy(logits.flatten(0, 1), labels.to(device).flatten(), reduction="sum"))
        tokens += int((labels != IGNORE).sum())
    return total / tokens


def greedy_answer(model: MoETransformer, tokenizer: Tokenizer, example: Example) -> str:
    """Return the greedy answer to `example`'s prompt, at most its answer's length plus one token, cut at eos."""
    out = greedy_generate(model, example.ids[: example.prompt_len], example.completion_tokens + 1)
    if tokenizer.eos_id in out:
        out = out[: out.index(tokenizer.eos_id)]
    return tokenizer.decode(out)


def evaluate(
    model: MoETransformer, wrappers: dict[str, LoraLinear], tokenizer: Tokenizer, examples: list[Example]
) -> dict[str, Any]:
    """Return {"examples", "loss", "exact_match"} of the adapted model on `examples` (module docstring)."""
    if not examples:
        return {"examples": 0, "loss": None, "exact_match": None}
    with merged(wrappers), torch.inference_mode():
        loss = heldout_loss(model, examples, tokenizer.eos_id)
        hits = sum(greedy_answer(model, tokenizer, e).strip() == e.answer.strip() for e in examples)
    return {"examples": len(examples), "loss": round(loss, 6), "exact_match": hits / len(examples)}
