"""Adapters through the real server: `matrixstack engine serve --lora-modules NAME=DIR --adapters-dir DIR` in a
second process, called with the official `openai` client: `model` = an adapter name serves it, concurrent requests
for different adapters and the base each get what they get alone, GET /v1/models lists the adapters under their
parent, an unknown adapter is a 404 model_not_found and a bad adapter folder a 400 saying what is wrong; and an L1
entry with `adapter: NAME` over a shape's builtin-engine L0, called through the real portal, reaches the engine's
adapter."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import httpx
import openai
import pytest
from test_engine_lora import ADAPTERS, TINY_MOE
from test_engine_lora_adapter import random_adapter
from test_stack_shape import db, tiny_data

from matrixstack.engine.config import EngineConfig
from matrixstack.engine.llm_engine import AsyncEngine, LLMEngine
from matrixstack.engine.loading import load_model
from matrixstack.engine.lora_adapter import write_peft
from matrixstack.engine.model_runner import ModelRunner
from matrixstack.engine.server import create_app
from matrixstack.openai.server import ServerThread
from matrixstack.portal.server import PortalThread
from matrixstack.stack.apply import apply_shape, record_started
from matrixstack.stack.site import Started
from matrixstack.stack.spec import parse_shape

BASE = "tiny-moe"
NO_EOS = {"ignore_eos": True}
PROMPTS = ["The for statement", "A class definition", "Exceptions are", "The import statement", "Names refer"]


class Served(NamedTuple):
    """The adapter-serving engine of this module: its client, base URL and the folder of adapter `kw`."""

    client: openai.OpenAI
    url: str
    kw_folder: Path


@pytest.fixture(scope="module")
def served(engine_process, tmp_path_factory):
    """Return an engine serving four adapters (`kw` by --lora-modules, the others and a bad one, rank over the
    limit, from --adapters-dir)."""
    root, elsewhere = tmp_path_factory.mktemp("adapters"), tmp_path_factory.mktemp("elsewhere")
    for name, spec in ADAPTERS.items():
        write_peft(random_adapter(TINY_MOE, name, std=0.1, **spec), (elsewhere if name == "kw" else root) / name, BASE)
    write_peft(random_adapter(TINY_MOE, "wide", rank=32), root / "wide", BASE)
    _, url = engine_process("--adapters-dir", str(root), "--lora-modules", f"kw={elsewhere / 'kw'}", "--max-loras", "3")
    return Served(openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120), url, elsewhere / "kw")


def complete(client: openai.OpenAI, model: str, prompt: str) -> str:
    out = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0, extra_body=NO_EOS)
    assert out.model == model and out.usage.completion_tokens == 8
    return out.choices[0].text


def test_models_lists_the_adapters_under_their_parent(served):
    client, url, _ = served
    assert [m.id for m in client.models.list()] == [BASE, "fin", "kw", "legal", "med", "wide"]
    cards = {c["id"]: c for c in httpx.get(f"{url}/models").json()["data"]}
    assert "parent" not in cards[BASE] and {cards[n]["parent"] for n in ADAPTERS} == {BASE}
    assert client.models.retrieve("kw").id == "kw"


def test_adapters_and_the_base_batched_together_answer_as_alone(served):
    client = served.client
    models = [*ADAPTERS, BASE]
    alone = [complete(client, m, p) for m, p in zip(models, PROMPTS, strict=True)]
    with ThreadPoolExecutor(len(models)) as pool:  # five adapters' worth of requests over three slots, at once
        together = list(pool.map(lambda mp: complete(client, *mp), zip(models, PROMPTS, strict=True)))
    assert together == alone
    base_answers = [complete(client, BASE, p) for p in PROMPTS[:4]]
    assert sum(a != b for a, b in zip(alone[:4], base_answers, strict=True)) >= 3  # the adapters do change answers
    chat = client.chat.completions.create(
        model="legal", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, extra_body=NO_EOS
    )
    assert chat.model == "legal" and chat.usage.completion_tokens == 4


@pytest.mark.parametrize("name", ["nope", "../kw", "kw/..", ".kw"])
def test_an_unknown_adapter_is_a_404_model_not_found(served, name):
    client = served.client
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model=name, prompt="Hi", max_tokens=2)
    assert caught.value.code == "model_not_found" and "does not exist" in caught.value.message


def test_a_bad_adapter_folder_is_a_400_naming_what_is_wrong(served):
    client = served.client
    with pytest.raises(openai.BadRequestError, match="rank 32, above the limit 16; raise --max-lora-rank"):
        client.completions.create(model="wide", prompt="Hi", max_tokens=2)
    assert complete(client, "kw", "Hi")  # the engine goes on serving


def test_an_l1_with_an_adapter_reaches_it_through_the_portal(served, tmp_path, monkeypatch):
    client, url, _ = served
    monkeypatch.setenv("MATRIXSTACK_HOME", str(tmp_path / "home"))
    data = tiny_data()
    data["catalog"].append({"name": "tiny-moe-kw", "level": "L1", "parent": "tiny-moe", "adapter": "kw"})
    shape, database = parse_shape(data, "adapters"), db(tmp_path, "portal")
    key = next(k.plaintext for k in apply_shape(shape, database).new_keys if k.tenant == "default")
    record_started(shape, [Started("tiny-moe", url)], database)
    with PortalThread(database, cache_ttl_s=0.0) as portal:
        through = openai.OpenAI(base_url=portal.base_url, api_key=key, max_retries=0, timeout=120)
        out = through.completions.create(
            model="tiny-moe-kw", prompt=PROMPTS[0], max_tokens=8, temperature=0, extra_body=NO_EOS
        )
        base = through.completions.create(
            model="tiny-moe", prompt=PROMPTS[0], max_tokens=8, temperature=0, extra_body=NO_EOS
        )
    assert out.model == "tiny-moe-kw" and out.choices[0].text == complete(client, "kw", PROMPTS[0])
    assert base.choices[0].text == complete(client, BASE, PROMPTS[0]) != out.choices[0].text


class WithoutSlots:
    """A model runner without adapter slots, as the expert-parallel runner is: only `run`."""

    def __init__(self, runner: ModelRunner):
        self.run = runner.run


def test_a_deployment_without_slots_answers_an_adapter_with_a_400(served):
    model, tokenizer = load_model(BASE)
    config = EngineConfig(num_kv_blocks=32, max_model_len=256, lora_modules={"kw": str(served.kw_folder)})
    engine = AsyncEngine(LLMEngine(WithoutSlots(ModelRunner(model, config)), tokenizer, config))
    server = ServerThread(create_app(engine, BASE)).start()
    try:
        plain = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError, match=r"expert parallel \(--workers > 1\), which serves no"):
            plain.completions.create(model="kw", prompt="Hi", max_tokens=2)
        with pytest.raises(openai.NotFoundError):
            plain.completions.create(model="nope", prompt="Hi", max_tokens=2)
        assert plain.completions.create(model=BASE, prompt="Hi", max_tokens=2).usage.completion_tokens >= 1
    finally:
        server.stop()
        engine.close()


def test_a_lora_module_that_is_not_name_equals_dir_exits_2(cli):
    result = cli("engine", "serve", "tiny-moe", "--lora-modules", "kw", "--port", "0")
    assert result.exit_code == 2 and "--lora-modules 'kw': give NAME=DIR" in " ".join(result.output.split())
