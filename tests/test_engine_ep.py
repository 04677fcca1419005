"""Expert parallelism with real worker processes (gloo on CPU): an EP deployment gives the single-process output
(greedy tokens, seeded samples and logits), with default, custom and redundant expert placement; a killed worker
fails its step fast with a clear error and the deployment recovers; no worker outlives its driver. The same holds for
ranks started elsewhere that connect back over TCP (`TcpLauncher`, what the ray site uses), here local processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from matrixstack.arch import Arch, load_arch
from matrixstack.engine import PACKAGED_WEIGHTS
from matrixstack.engine.config import EngineConfig, SamplingParams
from matrixstack.engine.ep import ExpertParallelRunner, WorkerError
from matrixstack.engine.ep_launch import TcpLauncher, connect_rank
from matrixstack.engine.ep_worker import ExpertPlacement
from matrixstack.engine.llm_engine import AsyncEngine, LLMEngine
from matrixstack.engine.model import MoETransformer
from matrixstack.engine.model_runner import ModelRunner
from matrixstack.engine.scheduler import Scheduler
from matrixstack.engine.sequence import Sequence
from matrixstack.engine.server import create_app
from matrixstack.engine.tokenizer import Tokenizer
from matrixstack.engine.weights import load_weights, save_weights
from matrixstack.errors import UserError
from matrixstack.openai.server import ServerThread

LOGITS_ATOL = 1e-4
LIVENESS_S = 60.0  # a bound on waiting for something that must happen, so a broken build fails instead of hanging
# Small blocks and a 32-token step budget: the longer prompts are prefilled in chunks, as in production.
CONFIG = EngineConfig(block_size=8, num_kv_blocks=96, max_model_len=256, max_num_seqs=8, max_num_batched_tokens=32)
PROMPTS = [
    "def main():",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "x",
    "import os\nimport sys\n",
    "class Matrix:\n    def __init__(self, rows, cols):\n",
]
GREEDY = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (10, 6, 14, 8)]
PARAMS = [*GREEDY, SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=9, ignore_eos=True)]
EP_KWARGS = {"backend": "gloo", "threads_per_worker": 1}

# DeepSeek-style: MLA attention, sigmoid gating with group-limited routing, a shared expert, a dense first layer.
MLA_ARCH = Arch(
    name="tiny-mla-ep",
    hidden_size=64,
    layers=3,
    vocab_size=211,
    tie_embeddings=False,
    native_dtype="fp32",
    rope_theta=10000.0,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    attention={
        "kind": "mla",
        "heads": 4,
        "kv_heads": 4,
        "head_dim": 24,
        "mla": {"q_lora_rank": 32, "kv_lora_rank": 16, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 12},
    },  # fmt: skip
    ffn={
        "dense_intermediate": 96,
        "moe": {
            "routed_experts": 8,
            "experts_per_token": 2,
            "shared_experts": 1,
            "expert_intermediate": 32,
            "gating": "sigmoid",
            "groups": 4,
            "topk_groups": 2,
            "norm_topk_prob": True,
            "routed_scaling_factor": 2.5,
            "dense_layers": [0],
        },
    },  # fmt: skip
)


def randomized(arch: Arch, seed: int = 0) -> MoETransformer:
    """Return a model with random weights large enough that routing and logits are decisive."""
    torch.manual_seed(seed)
    model = MoETransformer(arch)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.1 * torch.randn_like(p))
    return model.eval()


def loaded(arch: Arch, weights_dir: Path) -> MoETransformer:
    model = MoETransformer(arch)
    load_weights(model, weights_dir)
    return model.eval()


def alive(pid: int) -> bool:
    """Return True while process `pid` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:  # no procfs
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return state != "Z"


def wait_until_gone(pids: list[int]) -> list[int]:
    """Return the pids still alive after waiting up to LIVENESS_S for them to exit."""
    deadline = time.monotonic() + LIVENESS_S
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The workers take the cores; a reference model on several threads beside them runs several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    """The packaged tiny-moe weights when they exist, else random ones saved with `save_weights`."""
    packaged = PACKAGED_WEIGHTS["tiny-moe"]
    if any(packaged.glob("*.safetensors")):
        return packaged
    folder = tmp_path_factory.mktemp("tiny-moe")
    save_weights(randomized(load_arch("tiny-moe")), folder / "model.safetensors")
    return folder


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(PACKAGED_WEIGHTS["tiny-moe"] / "tokenizer.json")


@pytest.fixture(scope="module")
def tiny_reference(tiny_weights, tokenizer):
    """The single-process completions of PROMPTS and the model behind them."""
    model = loaded(load_arch("tiny-moe"), tiny_weights)
    completions = LLMEngine(ModelRunner(model, CONFIG), tokenizer, CONFIG).generate(PROMPTS, PARAMS)
    return model, [c.token_ids for c in completions]


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"{n}-workers")
def tiny_ep(request, tiny_weights):
    with ExpertParallelRunner("tiny-moe", tiny_weights, CONFIG, workers=request.param, **EP_KWARGS) as ep:
        yield ep


def compare_logits(ep: ExpertParallelRunner, model: MoETransformer, prompts: list[list[int]], max_tokens: int):
    """Drive both runners with the same scheduled steps (greedy on the reference) and compare every sampled row's
    logits; return the number of steps."""
    reference = ModelRunner(model, CONFIG)
    scheduler = Scheduler(CONFIG, eos_token_id=None)
    for i, ids in enumerate(prompts):
        scheduler.add(Sequence(f"logits-{i}", ids, SamplingParams(temperature=0, max_tokens=max_tokens)))
    steps = 0
    while scheduler.num_unfinished:
        out = scheduler.schedule()
        got = ep.run_logits(out)
        with torch.inference_mode():
            want = model.compute_logits(reference.hidden(out)[out.logits_indices])
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=LOGITS_ATOL, rtol=0)
        scheduler.postprocess(out, want.argmax(dim=-1).tolist())
        steps += 1
    return steps


def test_ep_generate_matches_single_process(tiny_ep, tiny_reference, tokenizer):
    _, want = tiny_reference
    got = LLMEngine(tiny_ep, tokenizer, CONFIG).generate(PROMPTS, PARAMS)
    assert [c.token_ids for c in got] == want  # greedy ones and the seeded sample
    assert [len(t) for t in want] == [p.max_tokens for p in PARAMS]


def test_ep_logits_match_single_process(tiny_ep, tiny_reference, tokenizer):
    model, _ = tiny_reference
    prompts = [tokenizer.encode(p, add_bos=True) for p in PROMPTS[:3]]  # fewer sequences than 4 workers: idle ones
    assert compare_logits(tiny_ep, model, prompts, max_tokens=5) > 5


@pytest.mark.slow
def test_redundant_experts_give_same_output(tiny_weights, tiny_reference, tokenizer):
    _, want = tiny_reference
    placement = [3, 3, 0, 1, 2, 0, 1, 2]  # custom: worker 3 holds experts 0 and 1
    redundant = {0: [0, 1], 4: [3], 6: [0]}  # three copies of expert 0, two of experts 4 and 6
    with ExpertParallelRunner(
        "tiny-moe", tiny_weights, CONFIG, workers=4, placement=placement, redundant=redundant, **EP_KWARGS
    ) as ep:
        assert ep.placement.held_by(0) == {0, 2, 5, 6}
        assert ep.placement.replicas[0] == (3, 0, 1)
        got = LLMEngine(ep, tokenizer, CONFIG).generate(PROMPTS, PARAMS)
    assert [c.token_ids for c in got] == want


@pytest.mark.slow
def test_mla_arch_matches_single_process(tmp_path, tokenizer):
    """A DeepSeek-style arch (MLA, group-limited sigmoid routing) over 2 workers, one holding 5 experts."""
    save_weights(randomized(MLA_ARCH, seed=1), tmp_path / "model.safetensors")
    model = loaded(MLA_ARCH, tmp_path)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, MLA_ARCH.vocab_size, (n,), generator=gen).tolist() for n in (5, 40, 17)]
    want = LLMEngine(ModelRunner(model, CONFIG), tokenizer, CONFIG).generate(prompts, GREEDY[:3])
    placement = [0, 1, 0, 1, 0, 1, 0, 0]
    with ExpertParallelRunner(MLA_ARCH, tmp_path, CONFIG, workers=2, placement=placement, **EP_KWARGS) as ep:
        got = LLMEngine(ep, tokenizer, CONFIG).generate(prompts, GREEDY[:3])
        assert [c.token_ids for c in got] == [c.token_ids for c in want]
        assert compare_logits(ep, model, prompts[:2], max_tokens=3) > 3


def step_in_thread(engine: LLMEngine):
    """Run `engine.step()` on a thread; return (finished in time, the exception it raised or None)."""
    outcome: dict = {}

    def target():
        try:
            engine.step()
        except Exception as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout=LIVENESS_S)
    return not thread.is_alive(), outcome.get("error")


@pytest.mark.slow
def test_killed_worker_fails_fast_and_the_deployment_recovers(tiny_weights, tiny_reference, tokenizer):
    _, want = tiny_reference
    with ExpertParallelRunner("tiny-moe", tiny_weights, CONFIG, workers=2, **EP_KWARGS) as ep:
        engine = LLMEngine(ep, tokenizer, CONFIG)
        long = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
        seqs = [engine.add_request(p, long) for p in PROMPTS[:3]]
        for _ in range(4):
            engine.step()
        assert {ep.owner_of(s.request_id) for s in seqs} == {0, 1}  # data-parallel attention: both own some
        victim = ep.worker_pids[1]
        os.kill(victim, signal.SIGKILL)

        returned, error = step_in_thread(engine)
        assert returned, "run() hung after a worker died"
        assert isinstance(error, WorkerError)
        assert f"worker 1 (pid {victim}) died: killed by signal SIGKILL" in str(error)
        assert "in-flight requests failed" in str(error)
        assert sorted(error.request_ids) == sorted(s.request_id for s in seqs)
        assert not alive(victim) and not any(alive(p) for p in ep.worker_pids)  # the rest were stopped too

        # LLMEngine failed the in-flight requests (their KV cache died with the worker) ...
        assert all(s.finish_reason == "error" for s in seqs) and not engine.has_work()
        # ... and the next request restarts the workers and is served correctly.
        [done] = engine.generate([PROMPTS[0]], PARAMS[0])
        assert done.token_ids == want[0]
        assert ep.restarts == 1 and victim not in ep.worker_pids

        # A worker that dies while nothing is in flight is replaced silently at the next step.
        os.kill(ep.worker_pids[0], signal.SIGKILL)
        deadline = time.monotonic() + LIVENESS_S
        while ep.dead_workers() != [0] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ep.dead_workers() == [0]
        [done] = engine.generate([PROMPTS[2]], PARAMS[2])
        assert done.token_ids == want[2] and ep.restarts == 2
        pids = ep.worker_pids
    assert wait_until_gone(pids) == []


def read_stream_id(lines) -> str:
    """Return the response id of an SSE stream, reading its lines up to the first chunk."""
    for line in lines:
        if line.startswith("data: {"):
            return json.loads(line.removeprefix("data: "))["id"]
    raise AssertionError("the stream ended before its first chunk")


def test_streams_cut_by_a_dead_worker_end_with_done_and_name_only_their_own_request(tiny_weights, tokenizer):
    """Two streams on an expert-parallel engine; a worker is killed: each stream gets an error event that names no
    other request, then `data: [DONE]`."""
    body = {"model": "tiny-moe", "prompt": "Go on", "max_tokens": 200, "stream": True, "ignore_eos": True}
    with ExpertParallelRunner("tiny-moe", tiny_weights, CONFIG, workers=2, **EP_KWARGS) as ep:
        engine = AsyncEngine(LLMEngine(ep, tokenizer, CONFIG))
        try:
            with ServerThread(create_app(engine, "tiny-moe")) as server, httpx.Client(timeout=LIVENESS_S) as http:
                url = f"{server.url}/v1/completions"
                with http.stream("POST", url, json=body) as a, http.stream("POST", url, json=body) as b:
                    lines = [a.iter_lines(), b.iter_lines()]
                    streams = {read_stream_id(it): it for it in lines}
                    os.kill(ep.worker_pids[1], signal.SIGKILL)
                    events = {rid: [e for e in it if e] for rid, it in streams.items()}
        finally:
            engine.close()
    for rid, lines in events.items():
        other = next(r for r in events if r != rid)
        assert lines[-1] == "data: [DONE]", lines[-3:]
        error = json.loads(lines[-2].removeprefix("data: "))["error"]
        assert "died" in error["message"] and other not in error["message"], error
        assert other.removeprefix("cmpl-") not in error["message"]


@pytest.mark.slow
def test_close_leaves_no_worker_processes(tiny_weights):
    ep = ExpertParallelRunner("tiny-moe", tiny_weights, CONFIG, workers=2, **EP_KWARGS)
    pids = ep.worker_pids
    assert len(pids) == 2 and all(alive(p) for p in pids)
    ep.close()
    assert not any(alive(p) for p in pids)  # reaped by close(), no waiting needed
    ep.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        ep.run(Scheduler(CONFIG, None).schedule())


DRIVER = """
import json, os, signal, sys
from matrixstack.engine.config import EngineConfig
from matrixstack.engine.ep import ExpertParallelRunner
config = EngineConfig(**json.loads(sys.argv[2]))
ep = ExpertParallelRunner("tiny-moe", sys.argv[1], config, workers=2, backend="gloo", threads_per_worker=1,
                          start_method="spawn")
print(json.dumps(ep.worker_pids), flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # the driver vanishes without closing anything
"""


@pytest.mark.slow
def test_workers_exit_when_the_driver_dies(tiny_weights):
    """Also starts workers with `spawn` (the other tests use the default forkserver)."""
    driver = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(DRIVER), str(tiny_weights), CONFIG.model_dump_json()],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert driver.returncode == -signal.SIGKILL, driver.stderr
    pids = json.loads(driver.stdout.strip().splitlines()[-1])
    assert len(pids) == 2
    assert wait_until_gone(pids) == []


def test_placement_rules_and_errors(tiny_weights):
    default = ExpertPlacement.build(8, 4)
    assert default.replicas == tuple((e % 4,) for e in range(8))
    assert default.held_by(1) == {1, 5}
    one_each = ExpertPlacement.build(8, 8)
    assert [one_each.held_by(r) for r in range(8)] == [{r} for r in range(8)]
    assert ExpertPlacement.build(8, 3, redundant={2: [0, 1]}).replicas[2] == (2, 0, 1)
    table, counts = ExpertPlacement.build(4, 2, redundant={1: [0]}).tables(torch.device("cpu"))
    assert table.tolist() == [[0, -1], [1, 0], [0, -1], [1, -1]] and counts.tolist() == [1, 2, 1, 1]
    bad = [
        ({"placement": [0] * 7}, "placement has 7 entries"),
        ({"placement": [0] * 7 + [2]}, r"placement\[7\]=2 is not a worker"),
        ({"redundant": {9: [0]}}, "redundant names expert 9"),
        ({"redundant": {1: [1]}}, r"redundant\[1\] lists worker 1, which already holds expert 1"),
        ({"redundant": {1: [5]}}, r"redundant\[1\] names worker 5"),
    ]
    for kwargs, message in bad:
        with pytest.raises(UserError, match=message):
            ExpertPlacement.build(8, 2, **kwargs)
    with pytest.raises(UserError, match="at least 1 worker"):
        ExpertParallelRunner("tiny-moe", tiny_weights, CONFIG, workers=0)
    with pytest.raises(UserError, match="backend"):
        ExpertParallelRunner("tiny-moe", tiny_weights, CONFIG, workers=2, backend="mpi")
    with pytest.raises(UserError, match="no safetensors"):
        ExpertParallelRunner("tiny-moe", tiny_weights / "nowhere", CONFIG, workers=2)


def start_local_rank(rank: int, spec, address: tuple[str, int], authkey: bytes):
    """A `TcpLauncher` start_rank for tests: rank `rank` as a fresh local process that connects back over TCP, as a
    Ray actor does on the ray site; returns the callable that kills (and reaps) it."""
    process = torch.multiprocessing.get_context("forkserver").Process(
        target=connect_rank, args=(rank, spec, address, authkey), daemon=True
    )
    process.start()

    def kill() -> None:
        process.kill()
        process.join()

    return kill


@pytest.mark.slow
def test_ranks_connected_over_tcp_match_and_a_killed_one_fails_fast(tiny_weights, tiny_reference, tokenizer):
    _, want = tiny_reference
    launcher = TcpLauncher(start_local_rank)
    with ExpertParallelRunner("tiny-moe", tiny_weights, CONFIG, workers=2, launcher=launcher, **EP_KWARGS) as ep:
        engine = LLMEngine(ep, tokenizer, CONFIG)
        assert [c.token_ids for c in engine.generate(PROMPTS[:2], PARAMS[:2])] == want[:2]

        long = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
        seqs = [engine.add_request(p, long) for p in PROMPTS[:2]]
        for _ in range(2):
            engine.step()
        victim = ep.worker_pids[1]
        os.kill(victim, signal.SIGKILL)  # no process sentinel here: the driver sees its connections close
        returned, error = step_in_thread(engine)
        assert returned, "run() hung after a remote worker died"
        assert isinstance(error, WorkerError)
        assert f"worker 1 (pid {victim}) died: its connection closed" in str(error)
        assert sorted(error.request_ids) == sorted(s.request_id for s in seqs)
        assert wait_until_gone(ep.worker_pids) == []  # the other rank was killed through the launcher

        [done] = engine.generate([PROMPTS[2]], PARAMS[2])  # a fresh pair of ranks connects back
        assert done.token_ids == want[2] and ep.restarts == 1 and victim not in ep.worker_pids
        pids = ep.worker_pids
    assert wait_until_gone(pids) == []


def test_a_rank_that_never_connects_back_fails_the_start(tiny_weights):
    killed = []
    launcher = TcpLauncher(lambda rank, spec, address, authkey: lambda: killed.append(rank))
    with pytest.raises(WorkerError, match=r"could not start: ranks \[0, 1\] did not connect back"):
        ExpertParallelRunner("tiny-moe", tiny_weights, CONFIG, workers=2, launcher=launcher, start_timeout_s=0.5)
    assert killed == [0, 1]
