"""LoRA training parts on the engine's model (adapt.lora, adapt.examples, adapt.train's data order), and the
trained adapter against PEFT: the HF export of tiny-moe plus the adapter folder in `peft` gives the engine's logits
with the adapter applied (tolerance 1e-4 absolute on float32 logits, the engine-vs-transformers bound of
bench/engine_vs_hf.py), and the builtin engine serving the adapter by name decodes what the job's evaluation does."""

from __future__ import annotations

import math

import pytest
import torch

from matrixstack.adapt.examples import IGNORE, batch, packed, to_example
from matrixstack.adapt.lora import (
    MAX_RANK,
    FrozenExperts,
    attach_lora,
    check_rank,
    load_adapter,
    lora_parameters,
    merged,
    parse_targets,
    target_paths,
)
from matrixstack.adapt.spec import TuneSpec
from matrixstack.adapt.train import Placement, batch_indices, train
from matrixstack.arch import load_arch
from matrixstack.engine import ASSETS_DIR
from matrixstack.engine.hf_export import export_hf_folder
from matrixstack.engine.loading import load_model
from matrixstack.engine.lora_adapter import lora_modules, read_peft, write_peft
from matrixstack.engine.model import greedy_generate
from matrixstack.errors import UserError

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
LOGITS_ATOL = 1e-4  # float32 logits of two implementations of the same model (bench/engine_vs_hf.py's bound)
ROWS = [{"prompt": f"What is {a} plus {b}?", "completion": str(a + b)} for a in range(6) for b in range(4)]


def tokens(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor([tokenizer.encode(text, add_bos=True)])


def test_targets_are_the_attention_projections_and_experts_are_refused():
    assert parse_targets("q,k,v,o") == ATTENTION
    assert parse_targets("v_proj, q") == ["q_proj", "v_proj"]
    with pytest.raises(UserError, match="experts is not supported.*fused 3-D"):
        parse_targets("q,experts")
    with pytest.raises(UserError, match="gate: unknown"):
        parse_targets("q,gate")


def test_rank_above_the_limit_and_a_base_without_the_targets_are_refused():
    with pytest.raises(UserError, match=f"outside 1..{MAX_RANK}"):
        check_rank(MAX_RANK + 1, 16)
    with pytest.raises(UserError, match="must be positive"):
        check_rank(8, 0)
    v3 = load_arch("deepseek-v3")  # MLA: no k_proj / v_proj
    with pytest.raises(UserError, match="no k_proj in layer 0's attention.*kv_a_proj_with_mqa"):
        target_paths(lora_modules(v3), v3.name, ["k_proj"])


def test_the_adapter_starts_as_the_base_with_peft_s_init():
    model, tokenizer = load_model("tiny-moe")
    ids = tokens(tokenizer, "def f(x): return x")
    base = model.reference_forward(ids).detach()  # gradients on: the plain module path, as training takes
    wrappers = attach_lora(model, ATTENTION, 8, 16, torch.Generator().manual_seed(0))
    assert len(wrappers) == 4 * len(model.layers)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    assert all(p.requires_grad for p in lora_parameters(wrappers))
    for w in wrappers.values():
        assert torch.count_nonzero(w.lora_B) == 0 and w.scaling == 2.0
        bound = 1 / math.sqrt(w.lora_A.shape[1])  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in))
        assert w.lora_A.abs().max() <= bound and w.lora_A.abs().max() > 0.9 * bound
    assert torch.equal(model.reference_forward(ids).detach(), base)


def test_merged_weights_give_the_lora_path_s_logits_and_are_restored_exactly():
    model, tokenizer = load_model("tiny-moe")
    wrappers = attach_lora(model, ATTENTION, 4, 8, torch.Generator().manual_seed(1))
    with torch.no_grad():
        for w in wrappers.values():
            w.lora_B.normal_(std=0.05, generator=torch.Generator().manual_seed(2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = tokens(tokenizer, "class A: pass")
    lora_path = model.reference_forward(ids).detach()  # with gradients on: the plain modules, the wrappers
    with merged(wrappers), torch.inference_mode():
        fast_path = model.reference_forward(ids)  # no gradients: fused q/k/v over the merged weights
    assert (lora_path - model.reference_forward(ids).detach()).abs().max() == 0
    assert torch.allclose(fast_path, lora_path, atol=LOGITS_ATOL)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_frozen_experts_run_grouped_give_the_module_loop_s_gradients():
    model, tokenizer = load_model("tiny-moe")
    wrappers = attach_lora(model, ATTENTION, 8, 16, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for w in wrappers.values():
            w.lora_B.normal_(std=0.02, generator=torch.Generator().manual_seed(3))
    ids, labels = batch([to_example(tokenizer, row, 64) for row in ROWS[:6]], tokenizer.eos_id)
    learned = labels != IGNORE

    def gradients(executor) -> tuple[float, list[torch.Tensor]]:
        model.expert_executor = executor
        hidden = model(ids, torch.arange(ids.shape[1]), None, None)
        loss = torch.nn.functional.cross_entropy(model.compute_logits(hidden[learned]), labels[learned])
        loss.backward()
        grads = [p.grad.clone() for p in lora_parameters(wrappers)]
        for p in lora_parameters(wrappers):
            p.grad = None
        return float(loss), grads

    loop_loss, loop = gradients(model.expert_executor)
    grouped_loss, grouped = gradients(FrozenExperts(model))
    assert abs(loop_loss - grouped_loss) < 1e-5
    scale = max(float(g.abs().max()) for g in loop)
    assert scale > 0 and all(torch.allclose(a, b, atol=1e-5 * scale) for a, b in zip(loop, grouped, strict=True))


def test_packed_sequences_give_the_padded_batch_s_loss_and_gradients():
    model, tokenizer = load_model("tiny-moe")
    wrappers = attach_lora(model, ATTENTION, 8, 16, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for w in wrappers.values():
            w.lora_B.normal_(std=0.02, generator=torch.Generator().manual_seed(3))
    model.expert_executor = FrozenExperts(model)  # as training runs it
    rows = [{"prompt": "Add them: " + " plus ".join(["7"] * (n + 1)), "completion": str(7 * (n + 1))} for n in range(5)]
    chosen = [to_example(tokenizer, row, 64) for row in rows]
    assert len({len(e.ids) for e in chosen}) == len(chosen)  # every row padded differently
    padded_ids, padded_labels = batch(chosen, tokenizer.eos_id)
    flat_ids, positions, flat_labels, layout = packed(chosen, torch.device("cpu"))
    real = torch.zeros_like(padded_ids, dtype=torch.bool)
    for row, e in enumerate(chosen):
        real[row, : len(e.ids)] = True
    assert torch.equal(flat_ids, padded_ids[real]) and torch.equal(flat_labels, padded_labels[real])
    assert torch.equal(positions, real.nonzero()[:, 1]) and layout.index.numel() == int(real.sum())

    def loss_and_gradients(ids, positions, labels, meta) -> tuple[torch.Tensor, float, list[torch.Tensor]]:
        hidden = model(ids, positions, meta, None)
        learned = labels != IGNORE
        loss = torch.nn.functional.cross_entropy(model.compute_logits(hidden[learned]), labels[learned])
        loss.backward()
        grads = [p.grad.clone() for p in lora_parameters(wrappers)]
        for p in lora_parameters(wrappers):
            p.grad = None
        return hidden.detach(), float(loss), grads

    padded_hidden, padded_loss, padded = loss_and_gradients(
        padded_ids, torch.arange(padded_ids.shape[1]), padded_labels, None
    )
    flat_hidden, flat_loss, flat = loss_and_gradients(flat_ids, positions, flat_labels, layout)
    assert torch.allclose(flat_hidden, padded_hidden[real], atol=1e-5)
    assert abs(flat_loss - padded_loss) < 1e-5
    scale = max(float(g.abs().max()) for g in padded)
    assert scale > 0 and all(torch.allclose(a, b, atol=1e-5 * scale) for a, b in zip(padded, flat, strict=True))


def test_examples_learn_the_answer_only():
    _, tokenizer = load_model("tiny-moe")
    chat = {"messages": [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}]}
    example = to_example(tokenizer, chat, 64)
    prompt = tokenizer.encode(tokenizer.apply_chat_template(chat["messages"][:1]))
    assert example.ids[: example.prompt_len] == prompt
    assert example.ids[example.prompt_len :] == [*tokenizer.encode("4"), tokenizer.eos_id]
    short = to_example(tokenizer, ROWS[0], 64)
    ids, labels = batch([example, short], tokenizer.eos_id)
    learned = labels[0][labels[0] != IGNORE].tolist()
    assert learned == example.ids[example.prompt_len :]
    assert (labels[1][len(short.ids) - 1 :] == IGNORE).all()  # padding is not learned
    with pytest.raises(UserError, match="no room for its answer"):
        to_example(tokenizer, chat, len(prompt))


def test_data_order_is_a_function_of_seed_and_step_and_covers_each_epoch():
    epoch = [batch_indices(10, 4, 7, s) for s in range(3)]
    assert sorted(i for b in epoch for i in b) == list(range(10)) and [len(b) for b in epoch] == [4, 4, 2]
    assert batch_indices(10, 4, 7, 4) == batch_indices(10, 4, 7, 4)
    assert epoch != [batch_indices(10, 4, 8, s) for s in range(3)]
    assert batch_indices(10, 4, 7, 3) != epoch[0]  # the next epoch is shuffled again


def test_a_job_runs_its_epochs_or_its_steps():
    job = {"base": "tiny-moe", "dataset": "sums", "targets": ATTENTION, "out": "kw", "batch_size": 4}
    assert TuneSpec(**job, epochs=2).total_steps(10) == 6  # 3 batches per epoch, the last one of 2 rows
    assert TuneSpec(**job, steps=5).total_steps(10) == 5
    with pytest.raises(ValueError, match="exactly one of --steps S or --epochs E"):
        TuneSpec(**job, steps=5, epochs=1)
    with pytest.raises(ValueError, match="below --devices 8"):
        TuneSpec(**job, steps=5, devices=8)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Return (adapter folder written by write_peft, HF export folder) of an adapter trained 6 steps on ROWS."""
    folder = tmp_path_factory.mktemp("tune")
    spec = TuneSpec(
        base="tiny-moe", dataset="sums", targets=ATTENTION, steps=6, lr=1e-2, batch_size=4, out="sums", rank=8
    )
    _, tokenizer = load_model("tiny-moe")
    examples = [to_example(tokenizer, row, 64) for row in ROWS]
    final = train(spec, examples, Placement("cpu", (0,)), folder / "job")
    assert final.step == 6 and final.history[-1]["loss"] < final.history[0]["loss"]
    write_peft(final.adapter, folder / "adapter", "tiny-moe")
    hf = folder / "hf"
    export_hf_folder(load_arch("tiny-moe"), ASSETS_DIR / "tiny-moe", hf)
    return folder / "adapter", hf


def test_peft_on_the_hf_export_gives_the_engine_s_logits_with_the_trained_adapter(trained):
    from peft import PeftModel
    from transformers import Glm4MoeForCausalLM

    adapter_folder, hf = trained
    adapter = read_peft(adapter_folder, load_arch("tiny-moe"), MAX_RANK)
    model, tokenizer = load_model("tiny-moe")
    ids = tokens(tokenizer, tokenizer.apply_chat_template([{"role": "user", "content": "What is 3 plus 2?"}]))
    with torch.inference_mode():
        base_logits = model.reference_forward(ids)
    wrappers = attach_lora(model, adapter.target_modules, adapter.rank, adapter.alpha, torch.Generator())
    load_adapter(wrappers, adapter)
    engine_lora = model.reference_forward(ids).detach()
    with merged(wrappers), torch.inference_mode():
        engine_merged = model.reference_forward(ids)
    hf_model = Glm4MoeForCausalLM.from_pretrained(str(hf), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf_model, str(adapter_folder)).eval()
    with torch.inference_mode():
        peft_logits = peft_model(input_ids=ids).logits.float()
    assert (engine_lora - base_logits).abs().max() > 100 * LOGITS_ATOL  # the adapter changes the logits
    assert torch.allclose(peft_logits, engine_lora, atol=LOGITS_ATOL), (peft_logits - engine_lora).abs().max()
    assert torch.allclose(peft_logits, engine_merged, atol=LOGITS_ATOL), (peft_logits - engine_merged).abs().max()


def test_the_builtin_engine_serves_the_trained_adapter_by_name_with_the_tokens_evaluation_decodes(trained):
    from matrixstack.engine.config import EngineConfig, SamplingParams
    from matrixstack.engine.llm_engine import LLMEngine
    from matrixstack.engine.model_runner import ModelRunner

    adapter_folder, _ = trained
    adapter = read_peft(adapter_folder, load_arch("tiny-moe"), MAX_RANK)
    model, tokenizer = load_model("tiny-moe")
    prompts = [to_example(tokenizer, row, 64) for row in ROWS[::5]]
    prompt_ids = [e.ids[: e.prompt_len] for e in prompts]
    wrappers = attach_lora(model, adapter.target_modules, adapter.rank, adapter.alpha, torch.Generator())
    load_adapter(wrappers, adapter)
    with merged(wrappers):  # what adapt.evaluate decodes
        tuned = [greedy_generate(model, ids, 6) for ids in prompt_ids]
        base_model, _ = load_model("tiny-moe")
        base = [greedy_generate(base_model, ids, 6) for ids in prompt_ids]
    assert tuned != base  # the adapter changes the answers, or the comparison shows nothing
    cfg = EngineConfig(
        block_size=16, num_kv_blocks=64, max_num_seqs=8, max_num_batched_tokens=256, max_model_len=256,
        max_loras=2, adapters_dir=str(adapter_folder.parent),
    )  # fmt: skip
    served_model, _ = load_model("tiny-moe")
    engine = LLMEngine(ModelRunner(served_model, cfg), tokenizer, cfg)
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    served = engine.generate(prompt_ids, [greedy.model_copy(update={"lora": adapter_folder.name})] * len(prompt_ids))
    assert [c.token_ids for c in served] == tuned
