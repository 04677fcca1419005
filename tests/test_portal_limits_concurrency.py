"""Token limits hold under concurrency: many requests of one key at once overshoot its limit by one request at most.

A real engine server process (`matrixstack engine serve tiny-moe`) behind a real portal on loopback, over SQLite
and over PostgreSQL; the clients are the official `openai` package's `AsyncOpenAI`, all requests of a burst sent
at once. Each burst goes to a fresh key with a tokens-per-minute limit, and another to a fresh key with a lifetime
token quota (the limits of issue 15's report: tpm 100, quota 200, `max_tokens` 32). The portal reserves a
request's tokens when it admits it and settles them when it ends, so what the key is charged (its usage rows) stays
within the limit plus one request's most (its prompt and `max_tokens`), and the usage rows are the completed
requests: as many, with the tokens their responses reported.
"""

from __future__ import annotations

import asyncio

import openai
import pytest

from matrixstack.portal.catalog_service import add_entry
from matrixstack.portal.key_service import create_key
from matrixstack.portal.server import PortalThread
from matrixstack.portal.spec import EntrySpec
from matrixstack.portal.usage_service import usage_report

MAX_TOKENS = 32
TPM_LIMIT = 100
TOKEN_QUOTA = 200
USER = [{"role": "user", "content": "How are we doing?"}]
NO_EOS = {"ignore_eos": True}  # the engine's extension: generate exactly max_tokens tokens


@pytest.fixture(scope="module")
def upstream(engine_process):
    """Start `matrixstack engine serve tiny-moe` on a free port in a second process; return its base URL."""
    return engine_process("--max-model-len", "256", "--num-kv-blocks", "96", "--max-num-seqs", "8")[1]


@pytest.fixture
def portal(upstream, db_url):
    """Yield a running portal over a fresh database (SQLite or PostgreSQL) with one L0 entry on the engine."""
    with PortalThread(db_url, usage_interval_s=0.05) as server:
        server.portal.db.write(
            lambda session: add_entry(session, EntrySpec(name="tiny", level="L0", backend={"kind": "engine",
                                                                                          "url": upstream}))
        )  # fmt: skip
        yield server


async def burst(portal: PortalThread, key: str, n: int, stream: bool) -> tuple[list[openai.types.CompletionUsage], int]:
    """Send `n` chat requests of `key` at once; return (the usage of each that succeeded, how many got a 429)."""
    async with openai.AsyncOpenAI(base_url=portal.base_url, api_key=key, max_retries=0, timeout=120) as c:

        async def one() -> openai.types.CompletionUsage | None:
            try:
                if not stream:
                    reply = await c.chat.completions.create(
                        model="tiny", messages=USER, max_tokens=MAX_TOKENS, extra_body=NO_EOS
                    )
                    return reply.usage
                chunks = await c.chat.completions.create(
                    model="tiny", messages=USER, max_tokens=MAX_TOKENS, extra_body=NO_EOS, stream=True,
                    stream_options={"include_usage": True},
                )  # fmt: skip
                return [chunk async for chunk in chunks][-1].usage
            except openai.RateLimitError:
                return None

        results = await asyncio.gather(*(one() for _ in range(n)))
    done = [u for u in results if u is not None]
    return done, n - len(done)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize("n", [30, 100])
def test_concurrent_requests_overshoot_tpm_and_quota_by_one_request_at_most(portal, n, stream):
    database = portal.portal.db
    limits = {"tpm": {"tpm_limit": TPM_LIMIT}, "quota": {"token_quota": TOKEN_QUOTA}}
    keys = {name: database.write(lambda session, tenant=f"burst-{name}", kw=kw: create_key(session, tenant, **kw))
            for name, kw in limits.items()}  # fmt: skip
    for name, (info, plaintext) in keys.items():
        done, refused = asyncio.run(burst(portal, plaintext, n, stream))
        limit = TPM_LIMIT if name == "tpm" else TOKEN_QUOTA
        assert done and refused, f"{name}: {len(done)} done, {refused} refused: the limit was never reached"
        one_request_s_most = max(u.prompt_tokens for u in done) + MAX_TOKENS
        charged = sum(u.total_tokens for u in done)
        assert all(u.completion_tokens == MAX_TOKENS for u in done)
        assert charged <= limit + one_request_s_most, f"{name}: {len(done)} requests took {charged} tokens"

        assert portal.portal.writer.flush()
        rows = database.read(lambda session: usage_report(session, ("key",)))
        mine = next(r for r in rows if r["key"] == info.prefix)
        assert mine["requests"] - mine["errors"] == len(done)  # a usage row per completed request
        assert mine["total_tokens"] == charged  # and the tokens they reported, nothing for the refused ones
