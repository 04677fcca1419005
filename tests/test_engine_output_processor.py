"""The output side (engine.output_processor): text assembled from token deltas, stop strings across token
boundaries, held-back tails, finish reasons and token counts; with the scheduler, a request a stop string ended
is aborted and its KV blocks freed. The expected texts are those the engine gave when it checked stop strings
itself (the tests moved here from test_engine_scheduler.py with their expectations unchanged)."""

from __future__ import annotations

from matrixstack.engine.config import EngineConfig, SamplingParams
from matrixstack.engine.output_processor import OutputProcessor, RequestState
from matrixstack.engine.scheduler import Scheduler
from matrixstack.engine.sequence import Sequence, TokenDelta

PIECES = {1: "Hel", 2: "lo", 3: " wo", 4: "rld", 5: "!", 6: " Wh", 7: "at", 8: "?", 10: "END"}
EOS = 0


def decode_pieces(token_ids: list[int]) -> str:
    return "".join(PIECES.get(t, "") for t in token_ids)


def state(stop: list[str], request_id: str = "a", **kwargs) -> RequestState:
    return RequestState(request_id, [10], SamplingParams(temperature=0, stop=stop, **kwargs), decode_pieces)


def feed(s: RequestState, tokens: list[int]) -> list[str]:
    """Hand `s` one token delta per token (no finish reason); return the text of each."""
    return [s.process(TokenDelta(s.request_id, [t])).text for t in tokens]


def test_stop_string_across_token_boundaries_cuts_the_text_holds_back_the_stream_and_frees_the_blocks():
    sched = Scheduler(EngineConfig(block_size=4, num_kv_blocks=64, max_num_seqs=4, max_num_batched_tokens=64,
                                   max_model_len=64), EOS)  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=20, stop=["o world"])
    seq = Sequence("a", [10], params)
    sched.add(seq)
    s = RequestState("a", [10], params, decode_pieces)
    streamed, deltas = [], []
    for token in [1, 2, 3, 4, 5]:  # as LLMEngine.step and AsyncEngine.stream do
        out = sched.schedule()
        sched.postprocess(out, [token])
        delta = s.process(TokenDelta("a", [token], seq.finish_reason))
        if s.abort_in_engine:
            sched.abort("a")
        streamed.append(delta.text)
        deltas.append(delta)
        if delta.finish_reason:
            break
    # "Hel" / "lo" (held: "o" may start "o world") / " wo" (held: "o wo") / "rld" -> stop found
    assert streamed == ["Hel", "l", "", ""]
    assert deltas[-1].finish_reason == "stop" and "".join(streamed) == "Hell"
    assert deltas[-1].completion_tokens == 4 and [t for d in deltas for t in d.token_ids] == [1, 2, 3, 4]
    assert seq.finish_reason == "abort" and sched.num_unfinished == 0
    assert sched.block_manager.num_free_blocks == 64


def test_held_back_text_is_released_when_the_prefix_does_not_complete():
    s = state(stop=["o world", "?!"])
    chunks = feed(s, [1, 2, 3, 6, 8])  # "Hel" "lo" " wo" " Wh" "?"
    assert chunks == ["Hel", "l", "", "o wo Wh", ""]  # "?" held: it may start "?!"
    last = s.process(TokenDelta("a", [], "length"))
    assert last.text == "?" and "".join(chunks) + last.text == "Hello wo Wh?"
    assert not s.abort_in_engine and last.completion_tokens == 5


def test_stop_string_inside_one_token_and_earliest_match_wins():
    s = state(stop=["ld", "rl"])
    chunks = feed(s, [1, 3])
    last = s.process(TokenDelta("a", [4]))
    assert last.finish_reason == "stop" and "".join(chunks) + last.text == "Hel wo"


def test_incomplete_utf8_characters_are_not_streamed_until_complete():
    byte_tokens = {100 + i: bytes([b]) for i, b in enumerate("é€".encode())}

    def decode_bytes(ids: list[int]) -> str:
        return b"".join(byte_tokens.get(t, b"x") for t in ids).decode("utf-8", errors="replace")

    s = RequestState("u", [1], SamplingParams(max_tokens=10), decode_bytes)
    chunks = feed(s, sorted(byte_tokens))
    assert chunks == ["", "é", "", "", "€"] and "".join(chunks) == "é€"


def test_a_stop_token_adds_no_text_and_keeps_the_engines_reason():
    s = state(stop=["zzz"], stop_token_ids=[5])
    chunks = feed(s, [1, 2])
    last = s.process(TokenDelta("a", [5], "stop"))  # "!" is the stop token's own text
    assert "".join(chunks) + last.text == "Hello" and last.finish_reason == "stop"
    assert last.token_ids == [5] and last.completion_tokens == 3 and not s.abort_in_engine


def test_tokens_past_the_stop_string_are_dropped_and_not_counted():
    s = state(stop=["wo"])
    first = s.process(TokenDelta("a", [1]))
    last = s.process(TokenDelta("a", [2, 3, 4, 5]))  # the engine ran on past " wo" before this was read
    assert last.finish_reason == "stop" and first.text + last.text == "Hello "
    assert last.token_ids == [2, 3] and last.completion_tokens == 3 and s.abort_in_engine


def test_a_stop_string_on_the_last_token_the_engine_allowed_is_a_stop_with_nothing_to_abort():
    s = state(stop=["lo"])
    chunks = feed(s, [1])  # "Hel": "l" held, it may start "lo"
    last = s.process(TokenDelta("a", [2], "length"))  # max_tokens reached on the token completing "lo"
    assert chunks == ["He"] and last.text == "l" and last.finish_reason == "stop" and not s.abort_in_engine


def test_without_detokenize_tokens_pass_through_without_text():
    s = RequestState("a", [10], SamplingParams(max_tokens=3, detokenize=False), decode_pieces)
    deltas = [s.process(TokenDelta("a", [1])), s.process(TokenDelta("a", [2, 3], "length"))]
    assert [d.text for d in deltas] == ["", ""] and deltas[-1].finish_reason == "length"
    assert deltas[-1].completion_tokens == 3 and deltas[-1].prompt_tokens == 1


def test_output_processor_reports_the_requests_to_abort_and_forgets_finished_ones():
    processor = OutputProcessor(decode_pieces)
    processor.add_request("a", [10], SamplingParams(stop=["wo"]))
    processor.add_request("b", [10], SamplingParams(max_tokens=2))
    deltas, to_abort = processor.process([TokenDelta("a", [1]), TokenDelta("b", [1])])
    assert [d.text for d in deltas] == ["Hel", "Hel"] and to_abort == []
    deltas, to_abort = processor.process([TokenDelta("a", [3]), TokenDelta("b", [2], "length")])
    assert [(d.request_id, d.text, d.finish_reason) for d in deltas] == [("a", " ", "stop"), ("b", "lo", "length")]
    assert to_abort == ["a"]
    deltas, to_abort = processor.process([TokenDelta("a", [4]), TokenDelta("b", [], "abort")])
    assert deltas == [] and to_abort == []  # both finished: a late token of an aborted request is dropped
