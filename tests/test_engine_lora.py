"""Batched LoRA in the builtin engine: requests for different adapters and the base in one batch each get exactly
what they get alone, and the logits of the model with that adapter merged into its weights; adapters load on first
use into LRU slots, a running adapter is never evicted, and bad adapters are refused clearly."""

from __future__ import annotations

import pytest
import torch
from test_engine_lora_adapter import ATTENTION, random_adapter

from matrixstack.arch import load_arch
from matrixstack.engine import lora_batch
from matrixstack.engine.adapter_dir import UnknownAdapter
from matrixstack.engine.config import EngineConfig, SamplingParams
from matrixstack.engine.llm_engine import LLMEngine
from matrixstack.engine.loading import load_model
from matrixstack.engine.lora_adapter import LoraAdapter, write_peft
from matrixstack.engine.model_runner import ModelRunner
from matrixstack.engine.scheduler import Scheduler
from matrixstack.engine.sequence import Sequence, SequenceStatus
from matrixstack.errors import UserError

TINY_MOE = load_arch("tiny-moe")
FFN = ["gate_proj", "up_proj", "down_proj"]
# four adapters that differ in rank, alpha and targets (attention only, FFN only, both)
ADAPTERS = {
    "kw": dict(rank=4, alpha=8.0, targets=ATTENTION, seed=1),
    "legal": dict(rank=8, alpha=16.0, targets=ATTENTION + FFN, seed=2),
    "med": dict(rank=16, alpha=16.0, targets=FFN, seed=3),
    "fin": dict(rank=2, alpha=4.0, targets=["q_proj", "v_proj"], seed=4),
}
PROMPTS = [
    "The for statement is used to iterate over",
    "A class definition defines a class object",
    "Exceptions are raised",
    "The import statement",
    "Names refer to objects.",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
LOGITS_ATOL = 1e-4  # float32 round-off over 4 layers: delta as (x A^T) (s B^T) vs x (W + s B A)^T


def config(tmp_path, max_loras: int = 4, num_kv_blocks: int = 64) -> EngineConfig:
    return EngineConfig(
        block_size=16, num_kv_blocks=num_kv_blocks, max_num_seqs=8, max_num_batched_tokens=256, max_model_len=256,
        max_loras=max_loras, adapters_dir=str(tmp_path),
    )  # fmt: skip


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> tuple:
    """Return (adapters folder, {name: LoraAdapter}) with the four adapters written there in PEFT's format."""
    root = tmp_path_factory.mktemp("adapters")
    made = {name: random_adapter(TINY_MOE, name, std=0.1, **spec) for name, spec in ADAPTERS.items()}
    for name, adapter in made.items():
        write_peft(adapter, root / name, "tiny-moe")
    return root, made


def engine(root, max_loras: int = 4) -> LLMEngine:
    model, tokenizer = load_model("tiny-moe")
    cfg = config(root, max_loras)
    return LLMEngine(ModelRunner(model, cfg), tokenizer, cfg)


def with_lora(name: str | None) -> SamplingParams:
    return GREEDY.model_copy(update={"lora": name})


def merged_model(adapter: LoraAdapter | None):
    """Return tiny-moe with `adapter` merged into its weights: W + scaling * B @ A."""
    model, _ = load_model("tiny-moe")
    if adapter is not None:
        with torch.no_grad():
            for path, (a, b) in adapter.weights.items():
                model.get_submodule(path).weight += adapter.scaling * b @ a
    return model


def test_mixed_batch_gives_each_request_its_tokens_alone(adapters):
    root, _ = adapters
    names = [*ADAPTERS, None]
    eng = engine(root)
    together = eng.generate(PROMPTS, [with_lora(n) for n in names])
    alone = [eng.generate([p], with_lora(n))[0] for p, n in zip(PROMPTS, names, strict=True)]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    base = eng.generate(PROMPTS[:4], with_lora(None))
    differs = [c.token_ids != b.token_ids for c, b in zip(together[:4], base, strict=True)]
    assert sum(differs) >= 3, "the random adapters should change most outputs, or the test shows nothing"
    assert eng.runner.lora.loaded() == sorted(ADAPTERS)


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped_mm", "padded_bmm"])
def test_mixed_batch_logits_equal_the_merged_models(adapters, monkeypatch, grouped):
    monkeypatch.setattr(lora_batch, "grouped_mm_available", lambda device, dtype: grouped)
    monkeypatch.setattr(lora_batch, "PADDED_MAX_WASTE", 0.0)  # any padding counts as waste: grouped where it runs
    root, made = adapters
    names = [*ADAPTERS, None, "kw"]
    prompts = [*PROMPTS, PROMPTS[4]]
    eng = engine(root)
    tokenizer = eng.tokenizer
    seqs = [eng.add_request(p, with_lora(n)) for p, n in zip(prompts, names, strict=True)]
    out = eng.scheduler.schedule()
    assert len(out.seqs) == len(seqs) and sorted(set(out.lora_slots)) == [0, 1, 2, 3, 4]
    with torch.inference_mode():
        lora = eng.runner.lora.batch(out.lora_slots, out.num_new_tokens)
        assert lora.grouped is grouped
        logits = eng.runner.model.compute_logits(eng.runner.hidden(out))
    for i, (prompt, name) in enumerate(zip(prompts, names, strict=True)):
        ids = torch.tensor(tokenizer.encode(prompt, add_bos=True))
        with torch.no_grad():
            expected = merged_model(made.get(name)).reference_forward(ids)
        got = logits[out.cu_seqlens_q[i] : out.cu_seqlens_q[i + 1]]
        torch.testing.assert_close(got, expected, atol=LOGITS_ATOL, rtol=0)
        if name is None:  # the base rows of a mixed batch are the base model's
            assert torch.equal(got.argmax(-1), expected.argmax(-1))
    del seqs


def test_lru_loads_and_evicts_with_two_slots(adapters):
    root, _ = adapters
    eng = engine(root, max_loras=2)
    slots = eng.runner.lora
    first = {}
    for name, loaded, loads in [
        ("kw", ["kw"], 1),
        ("legal", ["kw", "legal"], 2),
        ("kw", ["kw", "legal"], 2),  # in a slot already: no load, and kw is now the most recently used
        ("med", ["kw", "med"], 3),  # evicts legal, the least recently used
        ("legal", ["legal", "med"], 4),  # evicts kw
        ("kw", ["kw", "legal"], 5),  # evicts med
    ]:
        tokens = eng.generate([PROMPTS[0]], with_lora(name))[0].token_ids
        assert (slots.loaded(), slots.loads) == (loaded, loads)
        assert first.setdefault(name, tokens) == tokens  # reloaded into another slot, same output


def test_a_running_adapter_is_never_evicted(adapters):
    root, _ = adapters
    eng = engine(root, max_loras=2)
    long = GREEDY.model_copy(update={"max_tokens": 20})
    a = eng.add_request(PROMPTS[0], long.model_copy(update={"lora": "kw"}))
    b = eng.add_request(PROMPTS[1], long.model_copy(update={"lora": "legal"}))
    eng.step()
    c = eng.add_request(PROMPTS[2], with_lora("med"))
    d = eng.add_request(PROMPTS[3], with_lora(None))
    for _ in range(5):
        eng.step()
        assert eng.runner.lora.loaded() == ["kw", "legal"]
        assert c.status is SequenceStatus.WAITING  # waits at the head of the queue for a slot ...
        assert d.status is SequenceStatus.WAITING  # ... and the base request behind it does not overtake (FCFS)
    while eng.has_work():
        eng.step()
    assert all(s.finish_reason == "length" for s in (a, b, c, d))
    assert c.output_token_ids == eng.generate([PROMPTS[2]], with_lora("med"))[0].token_ids
    assert eng.runner.lora.holders == [0, 0, 0]


def test_unknown_and_bad_adapters_are_refused_clearly(adapters, tmp_path):
    root, made = adapters
    eng = engine(root)
    for name in ["nope", "../kw", "..", "kw/../kw", ".hidden"]:
        with pytest.raises(UnknownAdapter, match="no adapter|is not an adapter name"):
            eng.add_request(PROMPTS[0], with_lora(name))
    bad = tmp_path / "bad"
    write_peft(random_adapter(TINY_MOE, "wide", rank=32, targets=["q_proj"]), bad / "wide", "tiny-moe")
    experts = random_adapter(TINY_MOE, "experts", targets=["gate_proj"])
    experts.weights = {"layers.1.mlp.experts.3.gate_proj": (torch.ones(4, 256), torch.ones(128, 4))}
    write_peft(experts, bad / "experts", "tiny-moe")
    (bad / "empty").mkdir()
    eng = engine(bad)
    cases = {
        "wide": "rank 32, above the limit 16; raise --max-lora-rank",
        "experts": "not on routed experts or MLA projections",
        "empty": "has no adapter_config.json",
    }
    for name, message in cases.items():
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
            eng.add_request(PROMPTS[0], with_lora(name))
    assert not eng.has_work() and eng.runner.lora.loaded() == []


def test_an_engine_without_slots_refuses_adapter_requests():
    scheduler = Scheduler(EngineConfig(), eos_token_id=None, lora=None)  # as an expert-parallel runner has none
    seq = Sequence("r", [1, 2, 3], with_lora("kw"))
    with pytest.raises(UserError, match=r"expert parallel \(--workers > 1\), which serves no LoRA adapters"):
        scheduler.add(seq)
    assert scheduler.num_unfinished == 0


@pytest.mark.slow
def test_peft_on_the_hf_export_gives_the_logits_the_engine_serves(adapters, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from matrixstack.engine import ASSETS_DIR
    from matrixstack.engine.hf_export import export_hf_folder

    root, _ = adapters
    export_hf_folder(TINY_MOE, ASSETS_DIR / "tiny-moe", tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    eng = engine(root)
    # attention adapters only: PEFT 0.21 on transformers 5's Glm4Moe maps gate/up/down_proj targets onto the fused
    # routed experts and drops the dense and shared-expert FFN weights (target_modules=set() after loading), so an
    # FFN adapter is checked against the merged weights instead (test_mixed_batch_logits_equal_the_merged_models)
    for name in ("kw", "fin"):
        ids = eng.tokenizer.encode(PROMPTS[1], add_bos=True)
        with torch.no_grad():
            base = hf(torch.tensor([ids])).logits[0]
            peft_model = PeftModel.from_pretrained(hf, str(root / name), adapter_name=name)
            expected = peft_model(torch.tensor([ids])).logits[0]
        assert (expected - base).abs().max() > 0.1  # the adapter matters
        eng.add_request(ids, with_lora(name))
        out = eng.scheduler.schedule()
        with torch.inference_mode():
            got = eng.runner.model.compute_logits(eng.runner.hidden(out))
        eng.abort(out.seqs[0].request_id)
        torch.testing.assert_close(got, expected, atol=LOGITS_ATOL, rtol=0)
        hf = peft_model.unload()  # the base model back, without this adapter's layers


def test_preempted_adapter_requests_release_their_slots_and_resume_exactly(adapters):
    root, _ = adapters
    model, tokenizer = load_model("tiny-moe")
    cfg = config(root, num_kv_blocks=16)  # 256 tokens of cache for five requests of up to 60: some get preempted
    eng = LLMEngine(ModelRunner(model, cfg), tokenizer, cfg)
    long = GREEDY.model_copy(update={"max_tokens": 50})
    names = [*ADAPTERS, None]
    seqs = [eng.add_request(p, long.model_copy(update={"lora": n})) for p, n in zip(PROMPTS, names, strict=True)]
    preempted = 0
    while eng.has_work():
        out = eng.scheduler.schedule()
        preempted += len(out.preempted)
        if not out.is_empty:
            eng.scheduler.postprocess(out, eng.runner.run(out))
    assert preempted > 0
    assert eng.runner.lora.holders == [0] * 5
    for seq, prompt, name in zip(seqs, PROMPTS, names, strict=True):
        assert seq.output_token_ids == eng.generate([prompt], long.model_copy(update={"lora": name}))[0].token_ids
