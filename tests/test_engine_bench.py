"""The engine benchmark harness (`matrixstack.tools.bench`, `matrixstack engine bench`): the request set, and the
report built from fixed timings (figures, keys, table rows, JSON); one real run of the CLI, as small as it goes.

No wall-clock assertion anywhere: timings depend on the machine. The benches themselves are run by `bench/`.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from matrixstack.cli.main import app
from matrixstack.errors import UserError
from matrixstack.tools.bench import (
    OUTPUT_TOKENS,
    PROMPT_TOKENS,
    PhaseTiming,
    bench_config,
    bench_report,
    make_requests,
    summarize,
    summary_rows,
)

SMALL = {"prompt_tokens": (8, 24), "output_tokens": (3, 6)}
FIGURES = ("prefill_tokens_per_s", "decode_tokens_per_s", "output_tokens_per_s", "ttft_ms_mean", "tpot_ms_mean")
SETUP = {"arch": "tiny-moe", "workers": 1, "runner": "ModelRunner", "seed": 0, "dtype": "float32", "device": "cpu"}
SHORT_SEED = 7  # the seed whose one request is short (98 prompt, 35 output tokens): the cheapest real run


def timing(**fields) -> PhaseTiming:
    """Return a phase's timings: fixed numbers, `fields` replacing some."""
    values = dict(
        wall_s=2.0,
        prefill_only_s=0.5,
        prefill_only_tokens=100,
        decode_only_s=1.5,
        decode_only_tokens=300,
        steps=40,
        ttft_s=[0.1, 0.3],
        tpot_s=[0.01, 0.02],
        output_tokens=320,
        sequences=[],
    )
    return PhaseTiming(**(values | fields))


PREFILL = timing(wall_s=0.6, prefill_only_s=0.4, prefill_only_tokens=800, decode_only_s=0.0, decode_only_tokens=0)


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


def test_figures_come_from_the_phases_timings():
    figures = summarize(PREFILL, timing())
    assert figures == pytest.approx(
        {
            "prefill_tokens_per_s": 800 / 0.4,
            "decode_tokens_per_s": 300 / 1.5,
            "output_tokens_per_s": 320 / 2.0,
            "ttft_ms_mean": 200.0,
            "tpot_ms_mean": 15.0,
            "serve_wall_s": 2.0,
            "serve_steps": 40,
            "decode_only_steps_s": 1.5,
            "output_tokens": 320,
            "prefill_wall_s": 0.6,
        }
    )
    without_prefill = summarize(None, timing())
    assert without_prefill["prefill_tokens_per_s"] is None and "prefill_wall_s" not in without_prefill
    idle = summarize(PREFILL, timing(decode_only_s=0.0, wall_s=0.0, ttft_s=[], tpot_s=[]))
    assert [idle[key] for key in FIGURES[1:]] == [0.0, 0.0, 0.0, 0.0]  # nothing timed: zero, not a division error


def test_report_has_every_key_and_is_json():
    requests = make_requests(3, 0, 4096, **SMALL)
    report = bench_report(SETUP, requests, PREFILL, timing(), bench_config(requests), **SMALL)
    for key in FIGURES:
        assert report[key] > 0, key
    assert report["prompt_tokens"] == sum(len(r.prompt_token_ids) for r in requests)
    assert report["output_tokens"] == 320 and report["requests"] == 3 and report["seed"] == 0
    assert report["runner"] == "ModelRunner" and report["workers"] == 1 and report["device"] == "cpu"
    assert report["config"]["max_num_seqs"] >= 3 and report["threads"] >= 1 and report["torch"]
    assert report["distribution"]["prompt_tokens"] == {"distribution": "uniform", "min": 8, "max": 24}
    assert {"dtype", "cpu", "cpu_count", "serve_wall_s", "prefill_wall_s"} <= set(report)
    assert json.loads(json.dumps(report)) == report  # serialisable as is
    over_workers = bench_report(SETUP | {"workers": 2}, requests, PREFILL, timing(), bench_config(requests), **SMALL)
    assert over_workers["device"] == "per worker"


def test_table_rows_format_the_report():
    requests = make_requests(3, 0, 4096, **SMALL)
    report = bench_report(SETUP, requests, PREFILL, timing(), bench_config(requests), **SMALL)
    rows = dict(summary_rows(report))
    assert rows["prefill tokens/s"] == "2,000" and rows["decode tokens/s"] == "200"
    assert rows["output tokens/s (end to end)"] == "160"
    assert rows["TTFT mean"] == "200.0 ms" and rows["TPOT mean"] == "15.00 ms"
    assert rows["prompt / output tokens"] == f"{report['prompt_tokens']:,} / 320"
    assert rows["threads, dtype, device"] == f"{report['threads']}, float32, cpu"
    assert rows["torch"] == torch.__version__


def test_cli_bench_table_shows_the_report(monkeypatch):
    requests = make_requests(1, 0, 4096, **SMALL)
    report = bench_report(SETUP, requests, PREFILL, timing(), bench_config(requests), **SMALL)
    monkeypatch.setattr("matrixstack.tools.bench.run_bench", lambda *args, **kwargs: report)
    table = CliRunner().invoke(app, ["engine", "bench", "tiny-moe", "--requests", "1", "--random-weights"])
    assert table.exit_code == 0, table.output
    assert "engine bench: tiny-moe, ModelRunner, 1 requests" in table.stdout
    assert "decode tokens/s" in table.stdout and "2,000" in table.stdout


def test_cli_bench_runs_the_engine_end_to_end():
    """The one real run: one short request through tiny-moe in this process, its JSON report."""
    args = ["engine", "bench", "tiny-moe", "--requests", "1", "--seed", str(SHORT_SEED), "--json", "--threads", "1"]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    result = json.loads(done.stdout)
    for key in FIGURES:
        assert result[key] > 0, key
    (request,) = make_requests(1, SHORT_SEED, 4096)
    assert result["output_tokens"] == request.output_tokens
    assert result["prompt_tokens"] == len(request.prompt_token_ids)
    assert result["requests"] == 1 and result["threads"] == 1 and result["runner"] == "ModelRunner"


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
