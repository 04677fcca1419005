"""Pick the next token of each sequence from its logits: greedy, or temperature + top-k + top-p sampling.

Sampling draws one uniform number per row and inverts the row's cumulative distribution. A row with a seeded
request draws from its own `torch.Generator`, so the same seed gives the same tokens whatever else is in the
batch; rows without a seed share the default generator.
"""

from __future__ import annotations

import torch

from matrixstack.engine.config import SamplingParams


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """Return a generator seeded with `seed` on `device` for a seeded request, or None for an unseeded one."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> torch.Tensor:
    """Return the sampled token id of each row of `logits` [N, V] as an int64 tensor [N].

    Row i uses `params[i]` and draws from `generators[i]` (None: the default generator). Greedy rows
    (temperature 0) take the argmax and draw nothing.
    """
    if not len(params) == len(generators) == logits.shape[0]:
        raise ValueError(f"{logits.shape[0]} logits rows, {len(params)} params, {len(generators)} generators")
    logits = logits.float()
    token_ids = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        row_params = [params[i] for i in rows]
        token_ids[rows] = _sample_rows(logits[rows], row_params, [generators[i] for i in rows])
    return token_ids


def _sample_rows(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> torch.Tensor:
    """Return one token id per row, sampled after temperature, top-k and top-p (the top token always stays)."""
    device = logits.device
    vocab_size = logits.shape[-1]
    temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
    top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab_size for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)

    sorted_logits, sorted_ids = torch.sort(logits / temperature[:, None], dim=-1, descending=True, stable=True)
    keep = torch.arange(vocab_size, device=device)[None, :] < top_k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(~keep, float("-inf")), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    keep &= mass_before < top_p[:, None]
    keep[:, 0] = True  # a top_p that is 0 in float32 (5e-324) would keep nothing
    cdf = probs.masked_fill(~keep, 0.0).cumsum(dim=-1)

    targets = _uniforms(generators, device) * cdf[:, -1]
    picks = torch.searchsorted(cdf, targets[:, None], right=True).squeeze(1)
    picks = torch.minimum(picks, keep.sum(dim=-1) - 1)  # a target rounded up to the total mass
    return sorted_ids.gather(1, picks[:, None]).squeeze(1)


def _uniforms(generators: list[torch.Generator | None], device: torch.device) -> torch.Tensor:
    """Return one uniform [0, 1) draw per row: from the row's generator, or from the default one."""
    draws = torch.rand(len(generators), device=device)
    for i, generator in enumerate(generators):
        if generator is not None:
            draws[i] = torch.rand(1, generator=generator, device=device)[0]
    return draws
