"""Sampler and SamplingParams tests: greedy, top-k, top-p, temperature, seeds, validation."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from matrixstack.engine.config import SamplingParams
from matrixstack.engine.sampler import make_generator, sample

VOCAB_SIZE = 32


def random_logits(num_rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(num_rows, VOCAB_SIZE, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax():
    logits = random_logits(6)
    params = [SamplingParams(temperature=0)] * 6
    assert torch.equal(sample(logits, params, [None] * 6), logits.argmax(dim=-1))


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(top_k=1),
        SamplingParams(top_p=1e-6, temperature=2.0),
        SamplingParams(top_p=5e-324),  # 0 in float32: kept nothing, an index error (a 500 found by schemathesis)
        SamplingParams(temperature=5e-324),  # 0 in float32: logits / 0 kept nothing either
    ],
)
def test_top_k_one_and_tiny_top_p_or_temperature_are_greedy(params):
    logits = random_logits(8, seed=1)
    generators = [make_generator(i) for i in range(8)]
    assert torch.equal(sample(logits, [params] * 8, generators), logits.argmax(dim=-1))


def test_greedy_and_sampled_rows_mix_in_one_batch():
    logits = random_logits(4, seed=2)
    params = [SamplingParams(temperature=0), SamplingParams(seed=3), SamplingParams(temperature=0), SamplingParams()]
    tokens = sample(logits, params, [make_generator(p.seed) for p in params])
    assert tokens.dtype == torch.int64 and tokens.shape == (4,)
    assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch():
    logits = random_logits(1, seed=4)[0]
    params = SamplingParams(temperature=1.5, top_p=0.95, seed=1234)

    def run(neighbours: int, position: int) -> list[int]:
        others = [SamplingParams(temperature=1.0, seed=i) for i in range(neighbours)]
        batch_params = others[:position] + [params] + others[position:]
        generators = [make_generator(p.seed) for p in batch_params]
        batch_logits = random_logits(neighbours + 1, seed=5)
        batch_logits[position] = logits
        return [int(sample(batch_logits, batch_params, generators)[position]) for _ in range(30)]

    alone = run(0, 0)
    assert len(set(alone)) > 1  # it really samples
    assert run(3, 1) == alone and run(6, 6) == alone


def test_top_k_and_top_p_restrict_the_candidates():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(400, 1)
    generator = make_generator(0)
    top_k = sample(logits, [SamplingParams(top_k=2)] * 400, [generator] * 400)
    assert set(top_k.tolist()) == {0, 1}
    # softmax: 0.636, 0.234, 0.086, ... -> top_p 0.8 keeps tokens 0 and 1 (0.636 < 0.8 <= 0.870)
    top_p = sample(logits, [SamplingParams(top_p=0.8)] * 400, [generator] * 400)
    assert set(top_p.tolist()) == {0, 1}


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_shapes_the_distribution(temperature):
    row = torch.tensor([2.0, 1.0, 0.0, -1.0])
    num_draws = 4000
    generator = make_generator(42)
    tokens = sample(
        row.repeat(num_draws, 1), [SamplingParams(temperature=temperature)] * num_draws, [generator] * num_draws
    )
    frequencies = torch.bincount(tokens, minlength=4).float() / num_draws
    expected = torch.softmax(row / temperature, dim=-1)
    assert torch.allclose(frequencies, expected, atol=0.03), (frequencies, expected)


def test_lower_temperature_concentrates_on_the_top_token():
    row = torch.tensor([1.0, 0.5, 0.0])
    shares = []
    for temperature in (0.3, 3.0):
        tokens = sample(
            row.repeat(2000, 1), [SamplingParams(temperature=temperature)] * 2000, [make_generator(7)] * 2000
        )
        shares.append(float((tokens == 0).float().mean()))
    assert shares[0] > 0.8 > 0.5 > shares[1]


def test_masked_vocabulary_entries_are_never_sampled():
    logits = torch.full((500, 6), float("-inf"))
    logits[:, 2] = 0.0
    logits[:, 4] = 0.0
    tokens = sample(logits, [SamplingParams(temperature=1.0)] * 500, [make_generator(1)] * 500)
    assert set(tokens.tolist()) == {2, 4}


@pytest.mark.parametrize(
    ("fields", "field_name"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": -2}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"seed": -1}, "seed"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"best_of": 2}, "best_of"),
    ],
)
def test_invalid_sampling_params_are_rejected_with_the_field_named(fields, field_name):
    with pytest.raises(ValidationError, match=field_name):
        SamplingParams(**fields)


def test_stop_accepts_a_single_string():
    assert SamplingParams(stop="\n\n").stop == ["\n\n"]
