"""Portal lineage resolution: merging a chain's settings and applying them to OpenAI request bodies."""

from __future__ import annotations

import copy

import pytest

from matrixstack.errors import UserError
from matrixstack.openai.endpoints import CHAT, COMPLETION
from matrixstack.portal.resolve import RangeError, resolve
from matrixstack.portal.spec import BackendSpec, EntrySpec

ENGINE = BackendSpec(kind="engine", url="http://127.0.0.1:8001/v1/", model="tiny-moe")


def _chain(adapters: bool = False, model: str | None = "tiny-moe") -> list[EntrySpec]:
    backend = ENGINE.model_copy(update={"adapters": adapters, "model": model})
    l0 = EntrySpec(
        name="base",
        level="L0",
        backend=backend,
        system_prompt="You are helpful.",
        knowledge=["fact zero"],
        parameters={"temperature": 0.7, "max_tokens": 256},
        parameter_ranges={"temperature": (0.0, 2.0), "max_tokens": (1, 1024)},
        stop=["<end>"],
        adapter="base-lora",
    )
    l1 = EntrySpec(
        name="industry",
        level="L1",
        parent="base",
        system_prompt="You know Python.",
        knowledge=["fact one", "fact two"],
        adapter="python-lora",
        parameters={"temperature": 0.3, "top_p": 0.9},
        parameter_ranges={"temperature": (0.0, 1.0)},
        stop=["###", "<end>"],
    )
    l2 = EntrySpec(
        name="scenario",
        level="L2",
        parent="industry",
        system_prompt="Check grammar.",
        parameters={"max_tokens": 64, "seed": 7},
        parameter_ranges={"temperature": (0.1, 1.5), "max_tokens": (1, 128)},
        stop=["\n\n"],
    )
    return [l0, l1, l2]


def test_resolve_merges_the_chain_root_first():
    r = resolve(_chain())
    assert r.entry == "scenario" and r.chain == ["base", "industry", "scenario"]
    assert r.backend.url == "http://127.0.0.1:8001/v1"  # the trailing slash is dropped when the spec validates
    assert r.system_prompt == (
        "You are helpful.\n\nYou know Python.\n\nCheck grammar.\n\n"
        "Reference material:\nfact zero\n\nfact one\n\nfact two"
    )
    assert r.defaults == {"temperature": 0.3, "max_tokens": 64, "top_p": 0.9, "seed": 7}
    assert r.ranges == {"temperature": (0.1, 1.0), "max_tokens": (1, 128)}
    assert r.stop == ["<end>", "###", "\n\n"]
    assert r.adapter == "python-lora"  # the deepest level that names one


def test_a_chain_of_one_and_knowledge_without_prompts():
    root = EntrySpec(name="solo", level="L0", backend=ENGINE, knowledge=["only this"])
    r = resolve([root])
    assert r.system_prompt == "Reference material:\nonly this"
    assert (r.defaults, r.ranges, r.stop, r.adapter) == ({}, {}, [], None)
    bare = resolve([EntrySpec(name="bare", level="L0", backend=ENGINE)])
    assert bare.system_prompt is None


def test_backend_model_is_the_adapter_the_backend_model_or_the_l0_name():
    assert resolve(_chain(adapters=True)).backend_model() == "python-lora"
    assert resolve(_chain(adapters=False)).backend_model() == "tiny-moe"
    assert resolve(_chain(adapters=False, model=None)).backend_model() == "base"
    no_adapter = _chain(adapters=True)
    no_adapter = [e.model_copy(update={"adapter": None}) for e in no_adapter]
    assert resolve(no_adapter).backend_model() == "tiny-moe"


def test_ranges_that_do_not_overlap_and_defaults_outside_the_chain_range_are_errors():
    l0, l1, _ = _chain()
    narrow = l1.model_copy(update={"parameter_ranges": {"temperature": (2.5, 3.0)}, "parameters": {}})
    with pytest.raises(
        UserError, match=r"parameter_ranges.temperature of 'industry': \[2.5, 3\] does not overlap the range \[0, 2\]"
    ):
        resolve([l0, narrow])
    tight = l1.model_copy(update={"parameter_ranges": {"max_tokens": (1, 100)}, "parameters": {}})
    with pytest.raises(UserError, match=r"parameters.max_tokens of 'industry': default 256 is outside the range"):
        resolve([l0, tight])
    with pytest.raises(UserError, match="starts at an L0 entry"):
        resolve([l1])


def test_apply_to_chat_builds_the_exact_body_and_leaves_the_request_alone():
    r = resolve(_chain())
    request = {"model": "scenario", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.5}
    before = copy.deepcopy(request)
    assert r.apply(CHAT, request) == {
        "model": "tiny-moe",
        "messages": [{"role": "system", "content": r.system_prompt}, {"role": "user", "content": "hi"}],
        "temperature": 0.5,
        "max_tokens": 64,
        "top_p": 0.9,
        "seed": 7,
        "stop": ["<end>", "###", "\n\n"],
    }
    assert request == before


def test_apply_to_chat_merges_before_the_users_system_message_and_the_request_stop():
    r = resolve(_chain()[:1])
    request = {
        "model": "base",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        "stop": "STOP",
        "max_completion_tokens": 10,
        "stream": True,
    }
    before = copy.deepcopy(request)
    body = r.apply(CHAT, request)
    assert request == before  # the merged system message is a new one, not the request's changed
    assert body == {
        "model": "tiny-moe",
        "messages": [
            {"role": "system", "content": "You are helpful.\n\nReference material:\nfact zero\n\nBe brief."},
            {"role": "user", "content": "hi"},
        ],
        "stop": ["STOP", "<end>"],
        "max_completion_tokens": 10,  # OpenAI's newer name: no max_tokens default is added beside it
        "stream": True,
        "temperature": 0.7,
    }
    parts = r.apply(CHAT, {"messages": [{"role": "system", "content": [{"type": "text", "text": "x"}]}]})
    assert parts["messages"][0]["content"] == [{"type": "text", "text": r.system_prompt}, {"type": "text", "text": "x"}]


def test_a_value_outside_the_range_is_a_range_error_naming_the_param():
    r = resolve(_chain())
    with pytest.raises(RangeError) as caught:
        r.apply(CHAT, {"messages": [], "temperature": 1.2})
    err = caught.value
    assert isinstance(err, UserError) and (err.param, err.value, err.low, err.high) == ("temperature", 1.2, 0.1, 1.0)
    assert str(err) == (
        "temperature=1.2 is outside the range this model allows [0.1, 1]; send a number within it or leave "
        "temperature out"
    )
    with pytest.raises(RangeError) as caught:
        r.apply(CHAT, {"messages": [], "max_completion_tokens": 500})
    assert caught.value.param == "max_completion_tokens"
    with pytest.raises(RangeError, match="temperature='0.5'"):
        r.apply(CHAT, {"messages": [], "temperature": "0.5"})  # a string would slip past the range: refused
    with pytest.raises(RangeError, match="max_tokens=1000"):
        r.apply(COMPLETION, {"prompt": "x", "max_tokens": 1000})


def test_apply_to_completion_prefixes_the_prompt():
    r = resolve(_chain())
    assert r.apply(COMPLETION, {"model": "scenario", "prompt": "def f(): pass", "top_p": 0.5, "stop": ["x"]}) == {
        "model": "tiny-moe",
        "prompt": r.system_prompt + "\n\ndef f(): pass",
        "top_p": 0.5,
        "stop": ["x", "<end>", "###", "\n\n"],
        "temperature": 0.3,
        "max_tokens": 64,
        "seed": 7,
    }
    many = r.apply(COMPLETION, {"prompt": ["a", "b"]})
    assert many["prompt"] == [r.system_prompt + "\n\na", r.system_prompt + "\n\nb"]
    with pytest.raises(UserError, match="prompt: model 'scenario' adds a system prompt"):
        r.apply(COMPLETION, {"prompt": [1, 2, 3]})
    plain = resolve([EntrySpec(name="plain", level="L0", backend=ENGINE)])
    assert plain.apply(COMPLETION, {"model": "plain", "prompt": [1, 2, 3]}) == {
        "model": "tiny-moe",
        "prompt": [1, 2, 3],
    }
