"""The stream relay (portal/relay.py) on raw event blocks: the model rewritten in place, usage and tokens read from
the text, and the usage chunk the relay adds when the backend sent none."""

from __future__ import annotations

import asyncio
import json

from matrixstack.openai.endpoints import CHAT, COMPLETION
from matrixstack.portal.relay import Metered, StreamRelay


async def _blocks(blocks):
    for block in blocks:
        yield block


def _relay(batches, endpoint=CHAT):
    finished: list[Metered] = []
    metered = Metered(request_id="r1", started_s=0.0, entry="tiny-moe-faq", stream=True)
    raw = [b"".join(b"data: %s\n\n" % json.dumps(c, separators=sep).encode() for c, sep in batch) for batch in batches]
    relay = StreamRelay(_blocks(raw[1:]), raw[0], endpoint, metered, finished.append)

    async def run():
        pieces = [piece async for piece in relay.events()]
        await relay.close()
        return pieces

    pieces = asyncio.run(run())
    text = b"".join(pieces).decode()
    events = [e.removeprefix("data: ") for e in text.split("\n\n") if e]
    return pieces, events, finished


def _chunk(content, **extra):
    return {"id": "c", "object": "chat.completion.chunk", "created": 7, "model": "backend-model",
            "choices": [{"index": 0, "delta": {"content": content}}], **extra}  # fmt: skip


def test_model_is_rewritten_whatever_the_spacing_and_usage_comes_from_the_backend():
    compact, spaced = (",", ":"), (", ", ": ")
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    tricky = _chunk('say "model": "x"')  # a quoted "model" inside the content is content, not the field
    batches = [[(_chunk("Hi"), compact)], [(tricky, spaced), (_chunk(""), spaced)],
               [({"id": "c", "choices": [], "model": "backend-model", "usage": usage}, compact)]]  # fmt: skip
    pieces, events, finished = _relay(batches)
    assert len(pieces) == 4 and pieces[-1] == b"data: [DONE]\n\n"  # a write per block, then [DONE] alone
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["model"] for c in chunks] == ["tiny-moe-faq"] * 4
    assert chunks[1]["choices"][0]["delta"]["content"] == 'say "model": "x"'
    m = finished[0]
    assert (m.status, m.prompt_tokens, m.completion_tokens) == (200, 5, 2)


def test_without_backend_usage_the_relay_counts_content_chunks_and_adds_a_usage_chunk():
    nameless = {"id": "t", "created": 9, "choices": [{"index": 0, "text": "abc"}]}
    batches = [[(nameless, (",", ":"))], [({"id": "t", "created": 9, "choices": [{"text": ""}]}, (",", ":"))]]
    _, events, finished = _relay(batches, endpoint=COMPLETION)
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["model"] == "tiny-moe-faq"  # added where the backend sent none
    assert chunks[-1]["usage"] == {"prompt_tokens": 0, "completion_tokens": 1, "total_tokens": 1}
    assert chunks[-1]["id"] == "t" and chunks[-1]["choices"] == []
    assert finished[0].completion_tokens == 1 and finished[0].ttft_s is not None


def test_two_usage_objects_in_a_block_the_last_counts_and_every_model_is_rewritten():
    metered = Metered(request_id="r", started_s=0.0, entry="faq")
    relay = StreamRelay(None, None, CHAT, metered, lambda m: None)
    block = (
        b'data: {"model":"m","choices":[{"delta":{"content":"a"}}],"usage":{"completion_tokens":1}}\n\n'
        b'data: {"choices":[{"delta":{"content":"b"}}],"model" : "m","usage":{"completion_tokens":2}}\n\n'
    )
    out = relay._encode(block)
    assert [json.loads(e[len(b"data: ") :])["model"] for e in out[:-2].split(b"\n\n")] == ["faq", "faq"]
    assert relay._usage == {"completion_tokens": 2} and relay._content_chunks == 2
