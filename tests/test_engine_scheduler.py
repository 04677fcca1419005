"""Scheduler, block manager and sequence tests, driven by a fake model that returns deterministic tokens."""

from __future__ import annotations

import random

import pytest

from matrixstack.engine.block_manager import BlockManager, blocks_for_tokens
from matrixstack.engine.config import EngineConfig, SamplingParams
from matrixstack.engine.scheduler import NO_BLOCK, Scheduler, SchedulerOutput
from matrixstack.engine.sequence import Sequence, SequenceStatus
from matrixstack.errors import UserError

EOS = 0
VOCAB_SIZE = 50


def fake_next_token(token_ids: list[int]) -> int:
    """A deterministic 'model': the next token depends only on the tokens so far (never EOS)."""
    return 1 + (sum(token_ids) * 7 + len(token_ids)) % (VOCAB_SIZE - 1)


def greedy(max_tokens: int | None = 8, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kwargs)


def seq(request_id: str, prompt_len: int, **kwargs) -> Sequence:
    return Sequence(request_id, [1 + (i % 40) for i in range(prompt_len)], greedy(**kwargs))


def check_batch(out: SchedulerOutput, block_size: int) -> None:
    """Recompute the flat batch from the sequences' block tables and check every field agrees."""
    assert out.cu_seqlens_q[0] == 0 and len(out.cu_seqlens_q) == len(out.seqs) + 1
    owners: dict[int, str] = {}
    for i, s in enumerate(out.seqs):
        lo, hi = out.cu_seqlens_q[i], out.cu_seqlens_q[i + 1]
        assert hi - lo == out.num_new_tokens[i] >= 1
        start = s.num_computed_tokens
        assert out.positions[lo:hi] == list(range(start, start + hi - lo))
        assert out.input_ids[lo:hi] == s.token_ids[start : start + hi - lo]
        assert out.context_lens[i] == start + hi - lo
        table = out.block_tables[i]
        real = [b for b in table if b != NO_BLOCK]
        assert table == real + [NO_BLOCK] * (len(table) - len(real)) and real == s.block_table
        assert len(real) >= blocks_for_tokens(out.context_lens[i], block_size)
        for block in real:
            assert owners.setdefault(block, s.request_id) == s.request_id, "a block has two owners"
        for pos, slot in zip(out.positions[lo:hi], out.slot_mapping[lo:hi], strict=True):
            assert slot == real[pos // block_size] * block_size + pos % block_size
    assert len({len(t) for t in out.block_tables}) <= 1
    assert len(set(out.slot_mapping)) == len(out.slot_mapping)
    for j, s in enumerate(out.sample_seqs):
        i = out.seqs.index(s)
        assert out.logits_indices[j] == out.cu_seqlens_q[i + 1] - 1
        assert out.context_lens[i] == s.num_tokens


def step(sched: Scheduler) -> tuple[SchedulerOutput, list[Sequence]]:
    out = sched.schedule()
    check_batch(out, sched.config.block_size)
    sampled = [fake_next_token(s.token_ids) for s in out.sample_seqs]
    return out, sched.postprocess(out, sampled)


def run_to_completion(sched: Scheduler, max_steps: int = 1000) -> list[SchedulerOutput]:
    outputs = []
    for _ in range(max_steps):
        if not sched.num_unfinished:
            return outputs
        out, _ = step(sched)
        assert not out.is_empty, "work is pending but nothing was scheduled"
        outputs.append(out)
    raise AssertionError("did not finish")


def reference_output(prompt: list[int], num_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(num_tokens):
        tokens.append(fake_next_token(tokens))
    return tokens[len(prompt) :]


# --- block manager ---------------------------------------------------------------------------------------------


def test_block_manager_allocates_grows_and_frees():
    bm = BlockManager(num_blocks=4, block_size=4)
    s = seq("a", 6)
    assert bm.can_allocate(s, 6) and bm.num_missing_blocks(s, 6) == 2
    bm.allocate(s, 6)
    assert len(s.block_table) == 2 and bm.num_free_blocks == 2
    s.num_computed_tokens = 6
    bm.allocate(s, 2)  # positions 6, 7 fit the second block
    assert len(s.block_table) == 2
    s.num_computed_tokens = 8
    bm.allocate(s, 1)  # position 8 opens a third block
    assert len(s.block_table) == 3 and bm.num_free_blocks == 1
    assert bm.slots(s, 7, 2) == [s.block_table[1] * 4 + 3, s.block_table[2] * 4]
    bm.free(s)
    assert s.block_table == [] and bm.num_free_blocks == 4


def test_block_manager_exhaustion():
    bm = BlockManager(num_blocks=2, block_size=4)
    a, b = seq("a", 8), seq("b", 1)
    bm.allocate(a, 8)
    assert bm.num_free_blocks == 0 and not bm.can_allocate(b, 1)
    with pytest.raises(RuntimeError, match="free blocks"):
        bm.allocate(b, 1)
    bm.free(a)
    assert bm.can_allocate(b, 1)


@pytest.mark.parametrize(
    ("prompt_len", "max_tokens", "expected"),
    [
        (30, 10, "prompt has 30 tokens and max_tokens is 10.*max_model_len=32.*lower max_tokens to at most 2"),
        (32, None, "prompt has 32 tokens.*max_model_len=32.*fewer than 32 tokens"),
        (40, 1, "prompt has 40 tokens.*max_model_len=32.*shorten the prompt"),
    ],
)
def test_prompt_that_can_never_fit_is_a_clear_user_error(prompt_len, max_tokens, expected):
    sched = Scheduler(EngineConfig(block_size=4, num_kv_blocks=8, max_model_len=32, max_num_seqs=4), EOS)
    with pytest.raises(UserError, match=expected):
        sched.add(seq("big", prompt_len, max_tokens=max_tokens))
    assert sched.num_unfinished == 0


def test_config_rejects_a_cache_smaller_than_one_sequence():
    with pytest.raises(ValueError, match="num_kv_blocks=2.*max_model_len=64.*raise num_kv_blocks to at least 4"):
        EngineConfig(block_size=16, num_kv_blocks=2, max_model_len=64)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        EngineConfig(max_num_seqs=8, max_num_batched_tokens=4)


def test_empty_prompt_is_a_user_error():
    with pytest.raises(UserError, match="prompt is empty"):
        Sequence("e", [], greedy())


# --- scheduler -------------------------------------------------------------------------------------------------


def make_scheduler(**overrides) -> Scheduler:
    fields = dict(block_size=4, num_kv_blocks=64, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=128)
    return Scheduler(EngineConfig(**(fields | overrides)), EOS)


def test_single_request_matches_reference_and_frees_blocks():
    sched = make_scheduler()
    a = seq("a", 10, max_tokens=5)
    sched.add(a)
    run_to_completion(sched)
    assert a.finish_reason == "length" and a.output_token_ids == reference_output(a.token_ids[:10], 5)
    assert a.block_table == [] and sched.block_manager.num_free_blocks == 64


def test_continuous_batching_admits_new_requests_while_others_decode():
    sched = make_scheduler()
    a = seq("a", 6, max_tokens=20)
    sched.add(a)
    step(sched)  # a's prefill
    step(sched)  # a decodes
    b = seq("b", 9, max_tokens=3)
    sched.add(b)
    out, _ = step(sched)
    assert out.seqs == [a, b] and out.num_new_tokens == [1, 9]  # a's decode first, b's prefill alongside
    assert out.sample_seqs == [a, b]
    run_to_completion(sched)
    assert b.output_token_ids == reference_output(b.token_ids[:9], 3)
    assert a.output_token_ids == reference_output(a.token_ids[:6], 20)


def test_chunked_prefill_splits_a_long_prompt_within_the_budget_then_decodes():
    sched = make_scheduler(max_num_batched_tokens=8)
    a = seq("a", 20, max_tokens=3)
    sched.add(a)
    chunks = []
    for _ in range(3):
        out, _ = step(sched)
        chunks.append(out.num_new_tokens)
        assert out.num_tokens <= 8
    assert chunks == [[8], [8], [4]]
    assert a.num_output_tokens == 1  # sampled only after the last chunk
    out, _ = step(sched)
    assert out.num_new_tokens == [1] and out.positions == [20]
    run_to_completion(sched)
    assert a.output_token_ids == reference_output(a.token_ids[:20], 3)


def test_decodes_go_first_and_a_prefill_chunk_takes_the_rest_of_the_budget():
    sched = make_scheduler(max_num_batched_tokens=8)
    a = seq("a", 4, max_tokens=10)
    sched.add(a)
    step(sched)
    b = seq("b", 30, max_tokens=2)
    sched.add(b)
    out, _ = step(sched)
    assert out.seqs == [a, b] and out.num_new_tokens == [1, 7] and out.sample_seqs == [a]
    out, _ = step(sched)
    assert out.num_new_tokens == [1, 7]  # b continues its prefill behind a's decode


def test_max_num_seqs_is_respected():
    sched = make_scheduler(max_num_seqs=2, max_num_batched_tokens=64)
    seqs = [seq(f"r{i}", 3, max_tokens=4) for i in range(5)]
    for s in seqs:
        sched.add(s)
    outputs = run_to_completion(sched)
    assert max(len(o.seqs) for o in outputs) == 2
    assert all(s.output_token_ids == reference_output(s.token_ids[:3], 4) for s in seqs)
    # FCFS: requests start in arrival order
    first_step = {s.request_id: next(i for i, o in enumerate(outputs) if s in o.seqs) for s in seqs}
    assert sorted(first_step, key=first_step.get) == [s.request_id for s in seqs]


def test_preemption_under_block_pressure_then_everything_completes():
    # 6 blocks of 4 tokens; each request grows to 8 + 12 = 20 tokens (5 blocks): they cannot all be resident.
    sched = make_scheduler(num_kv_blocks=6, max_model_len=24, max_num_batched_tokens=16, max_num_seqs=4)
    seqs = [seq(f"r{i}", 8, max_tokens=12) for i in range(3)]
    for s in seqs:
        sched.add(s)
    outputs = run_to_completion(sched)
    preempted = [p for o in outputs for p in o.preempted]
    assert preempted, "expected at least one preemption"
    assert seqs[0] not in preempted  # the oldest request is never the victim while newer ones run
    for s in seqs:
        assert s.finish_reason == "length"
        assert s.output_token_ids == reference_output(s.token_ids[:8], 12)  # recompute gives the same tokens
    assert sched.block_manager.num_free_blocks == 6


def test_preempted_sequence_is_reset_and_back_at_the_front_of_the_queue():
    sched = make_scheduler(num_kv_blocks=6, max_model_len=24, max_num_batched_tokens=16, max_num_seqs=4)
    a, b = seq("a", 8, max_tokens=12), seq("b", 8, max_tokens=12)
    sched.add(a)
    sched.add(b)
    while True:
        out, _ = step(sched)
        if out.preempted:
            break
    assert out.preempted == [b] and b.status is SequenceStatus.WAITING
    assert b.num_computed_tokens == 0 and b.block_table == [] and sched.waiting[0] is b
    assert b.num_output_tokens > 0  # its output so far is kept and recomputed as a prompt


def test_abort_waiting_and_running_sequences_frees_their_blocks():
    sched = make_scheduler(max_num_seqs=1)
    a, b = seq("a", 10, max_tokens=50), seq("b", 10, max_tokens=50)
    sched.add(a)
    sched.add(b)
    step(sched)
    assert a.status is SequenceStatus.RUNNING and b.status is SequenceStatus.WAITING
    assert sched.abort("b") is b and b.finish_reason == "abort" and b not in sched.waiting
    assert sched.abort("a") is a and a.finish_reason == "abort" and a.block_table == []
    assert sched.block_manager.num_free_blocks == 64 and sched.num_unfinished == 0
    assert sched.schedule().is_empty and sched.abort("a") is None


def test_abort_while_a_step_runs_is_skipped_by_postprocess():
    sched = make_scheduler()
    a = seq("a", 5)
    sched.add(a)
    out = sched.schedule()
    sched.abort("a", reason="error")
    assert sched.postprocess(out, [7]) == [] and a.num_output_tokens == 0 and a.finish_reason == "error"


def test_reusing_a_live_request_id_is_rejected():
    sched = make_scheduler()
    sched.add(seq("a", 3))
    with pytest.raises(ValueError, match="already"):
        sched.add(seq("a", 3))


# --- stop conditions -------------------------------------------------------------------------------------------


def scripted(sched: Scheduler, s: Sequence, tokens: list[int]) -> None:
    """Run `s` alone, feeding `tokens` as the model's outputs, until it finishes or they run out."""
    sched.add(s)
    for token in tokens:
        out = sched.schedule()
        sched.postprocess(out, [token] * len(out.sample_seqs))
        if s.is_finished:
            return


def test_eos_stops_unless_ignored():
    sched = make_scheduler()
    a = seq("a", 3, max_tokens=10)
    scripted(sched, a, [5, 6, EOS, 7])
    assert a.finish_reason == "stop" and a.output_token_ids == [5, 6, EOS]
    b = seq("b", 3, max_tokens=4, ignore_eos=True)
    scripted(sched, b, [5, EOS, EOS, 6, 7])
    assert b.finish_reason == "length" and b.output_token_ids == [5, EOS, EOS, 6]


def test_stop_token_ids_and_max_tokens():
    sched = make_scheduler()
    a = seq("a", 3, max_tokens=10, stop_token_ids=[9])
    scripted(sched, a, [5, 9, 7])
    assert a.finish_reason == "stop" and a.output_token_ids == [5, 9]
    b = seq("b", 3, max_tokens=2)
    scripted(sched, b, [5, 6, 7])
    assert b.finish_reason == "length" and b.output_token_ids == [5, 6]


def test_without_max_tokens_a_sequence_stops_at_max_model_len():
    sched = make_scheduler(max_model_len=12)
    a = seq("a", 8, max_tokens=None)
    scripted(sched, a, [5] * 10)
    assert a.finish_reason == "length" and a.num_tokens == 12


def test_random_workload_under_pressure_keeps_blocks_consistent_and_outputs_exact():
    rng = random.Random(0)
    sched = make_scheduler(num_kv_blocks=12, max_model_len=48, max_num_batched_tokens=12, max_num_seqs=5)
    prompts: dict[str, list[int]] = {}
    done: list[Sequence] = []
    for step_index in range(400):
        if step_index < 60 and rng.random() < 0.4:
            s = seq(f"r{step_index}", rng.randint(1, 30), max_tokens=rng.randint(1, 16))
            prompts[s.request_id] = s.token_ids[:]
            sched.add(s)
        if sched.running and rng.random() < 0.03:
            aborted = sched.abort(rng.choice(sched.running).request_id)
            assert aborted.block_table == [] and aborted.finish_reason == "abort"
        if sched.num_unfinished:
            out, finished = step(sched)
            assert not out.is_empty and len(out.seqs) <= 5 and out.num_tokens <= 12
            done += finished
        owned = sum(len(s.block_table) for s in sched.running)
        assert owned + sched.block_manager.num_free_blocks == 12
        assert all(s.block_table == [] for s in sched.waiting)
    assert sched.num_unfinished == 0 and len(done) > 10
    for s in done:
        assert s.output_token_ids == reference_output(prompts[s.request_id], s.num_output_tokens)
        assert s.num_output_tokens == s.params.max_tokens
