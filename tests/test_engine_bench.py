"""The engine benchmark harness (`matrixstack.tools.bench`, `matrixstack engine bench`): figures and keys only.

No wall-clock assertion anywhere: timings depend on the machine; the tests check that the figures exist, are
positive and add up, on request sets small enough to run in a second or two.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from matrixstack.cli.main import app
from matrixstack.errors import UserError
from matrixstack.tools.bench import OUTPUT_TOKENS, PROMPT_TOKENS, make_requests, run_bench

SMALL = {"prompt_tokens": (8, 24), "output_tokens": (3, 6)}
FIGURES = ("prefill_tokens_per_s", "decode_tokens_per_s", "output_tokens_per_s", "ttft_ms_mean", "tpot_ms_mean")


@pytest.fixture(autouse=True)
def _keep_global_rng():
    """Leave torch's global random state as the test found it (other modules' tests depend on it)."""
    with torch.random.fork_rng(devices=[]):
        yield


def test_request_set_is_seeded_and_inside_the_documented_ranges():
    requests = make_requests(32, seed=0)
    assert requests == make_requests(32, seed=0) and requests != make_requests(32, seed=1)
    assert all(PROMPT_TOKENS[0] <= len(r.prompt_token_ids) <= PROMPT_TOKENS[1] for r in requests)
    assert all(OUTPUT_TOKENS[0] <= r.output_tokens <= OUTPUT_TOKENS[1] for r in requests)
    assert len({len(r.prompt_token_ids) for r in requests}) > 10  # varied, not one length
    with pytest.raises(UserError, match="--requests"):
        make_requests(0)
    with pytest.raises(UserError, match="prompt lengths 5..4"):
        make_requests(2, prompt_tokens=(5, 4))


def test_one_process_bench_reports_positive_figures():
    result = run_bench("tiny-moe", num_requests=3, **SMALL)
    for key in FIGURES:
        assert result[key] > 0, key
    requests = make_requests(3, 0, 4096, **SMALL)
    assert result["output_tokens"] == sum(r.output_tokens for r in requests)
    assert result["prompt_tokens"] == sum(len(r.prompt_token_ids) for r in requests)
    assert result["runner"] == "ModelRunner" and result["workers"] == 1
    assert result["config"]["max_num_seqs"] >= 3 and result["threads"] >= 1 and result["torch"]
    assert result["distribution"]["prompt_tokens"] == {"distribution": "uniform", "min": 8, "max": 24}
    json.dumps(result)  # serialisable as is


def test_expert_parallel_bench_reports_positive_figures():
    result = run_bench("tiny-moe", workers=2, num_requests=2, **SMALL)
    assert result["runner"].startswith("ExpertParallelRunner") and result["workers"] == 2
    for key in FIGURES:
        assert result[key] > 0, key


def test_cli_bench_json_and_table():
    runner = CliRunner()
    done = runner.invoke(app, ["engine", "bench", "tiny-moe", "--requests", "2", "--json", "--threads", "1"])
    assert done.exit_code == 0, done.output
    result = json.loads(done.stdout)
    assert {"prefill_tokens_per_s", "decode_tokens_per_s", "ttft_ms_mean", "tpot_ms_mean", "config"} <= set(result)
    assert result["requests"] == 2 and result["threads"] == 1
    table = runner.invoke(app, ["engine", "bench", "tiny-moe", "--requests", "1", "--random-weights"])
    assert table.exit_code == 0, table.output
    assert "decode tokens/s" in table.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dtype", "float8"], "--dtype"),
        (["--device", "tpu"], "--device"),
        (["--workers", "2", "--random-weights"], "random weights"),
        (["--weights", "/nonexistent"], "tokenizer.json"),
    ],
)
def test_cli_bench_user_errors_exit_2(args, message):
    done = CliRunner().invoke(app, ["engine", "bench", "tiny-moe", "--requests", "1", *args])
    assert done.exit_code == 2
    assert message in done.output
