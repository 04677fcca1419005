"""LoRA adapters in PEFT's format: what `write_peft` writes loads in `peft` on the Hugging Face export of tiny-moe
under the names PEFT itself uses, `read_peft` reads what `peft` saved, and bad folders are refused clearly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_engine_model import ARCHS, MLA_ARCH
from torch import nn

from matrixstack.arch import load_arch
from matrixstack.engine import ASSETS_DIR
from matrixstack.engine.hf_export import export_hf_folder
from matrixstack.engine.lora_adapter import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    LoraAdapter,
    lora_modules,
    read_peft,
    write_peft,
)
from matrixstack.engine.model import MoETransformer
from matrixstack.errors import UserError

TINY_MOE = load_arch("tiny-moe")
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def random_adapter(
    arch, name: str, rank: int = 4, alpha: float = 8.0, targets=ATTENTION, seed: int = 0, std: float = 0.05
) -> LoraAdapter:
    """Return an adapter with random A and nonzero random B on every module of `arch` named in `targets`."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for path, (fan_in, fan_out) in lora_modules(arch).items():
        if path.rsplit(".", 1)[-1] in targets and ".experts." not in path:
            a = torch.randn(rank, fan_in, generator=generator) * std
            b = torch.randn(fan_out, rank, generator=generator) * std
            weights[path] = (a, b)
    return LoraAdapter(name, rank, alpha, list(targets), weights)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """Return tiny-moe exported as a Hugging Face folder."""
    out = tmp_path_factory.mktemp("hf")
    export_hf_folder(TINY_MOE, ASSETS_DIR / "tiny-moe", out)
    return out


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_lora_modules_are_the_models_linears(name):
    with torch.device("meta"):
        model = MoETransformer(ARCHS[name])
    linears = {
        path: (m.in_features, m.out_features)
        for path, m in model.named_modules()
        if isinstance(m, nn.Linear) and path.startswith("layers.")
    }
    assert lora_modules(ARCHS[name]) == linears


def test_write_read_round_trip(tmp_path):
    adapter = random_adapter(TINY_MOE, "kw", targets=["q_proj", "v_proj", "gate_proj"])
    write_peft(adapter, tmp_path / "kw", "tiny-moe")
    back = read_peft(tmp_path / "kw", TINY_MOE, max_rank=16)
    assert (back.name, back.rank, back.alpha, back.scaling) == ("kw", 4, 8.0, 2.0)
    assert sorted(back.target_modules) == ["gate_proj", "q_proj", "v_proj"]
    assert back.weights.keys() == adapter.weights.keys()
    for path, (a, b) in adapter.weights.items():
        assert torch.equal(back.weights[path][0], a) and torch.equal(back.weights[path][1], b)
    assert sorted(p.name for p in (tmp_path / "kw").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]


@pytest.mark.slow
def test_written_folder_loads_in_peft_under_its_names(tmp_path, hf_folder):
    from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    adapter = random_adapter(TINY_MOE, "kw", rank=8, alpha=16)
    write_peft(adapter, tmp_path / "kw", str(hf_folder))
    config = LoraConfig.from_pretrained(str(tmp_path / "kw"))
    assert (config.peft_type, config.task_type, config.r, config.lora_alpha) == ("LORA", "CAUSAL_LM", 8, 16)
    assert sorted(config.target_modules) == sorted(ATTENTION)
    base = AutoModelForCausalLM.from_pretrained(str(hf_folder), dtype=torch.float32)
    assert type(base).__name__ == "Glm4MoeForCausalLM"
    fresh = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=ATTENTION, task_type="CAUSAL_LM"))
    peft_names = {k: list(v.shape) for k, v in get_peft_model_state_dict(fresh).items()}
    ours = {k: list(v.shape) for k, v in load_file(str(tmp_path / "kw" / WEIGHTS_FILE)).items()}
    assert ours == peft_names
    loaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(hf_folder), dtype=torch.float32), str(tmp_path / "kw")
    )
    state = get_peft_model_state_dict(loaded)
    for path, (a, b) in adapter.weights.items():
        assert torch.equal(state[f"base_model.model.model.{path}.lora_A.weight"], a)
        assert torch.equal(state[f"base_model.model.model.{path}.lora_B.weight"], b)


@pytest.mark.slow
def test_reads_a_folder_peft_saved(tmp_path, hf_folder):
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(hf_folder), dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "o_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)  # PEFT starts B at zero; a trained adapter's is not
    model.save_pretrained(str(tmp_path / "peft-saved"))
    adapter = read_peft(tmp_path / "peft-saved", TINY_MOE, max_rank=8, name="saved")
    assert (adapter.name, adapter.rank, adapter.alpha, adapter.scaling) == ("saved", 4, 12, 3.0)
    assert sorted(adapter.target_modules) == ["o_proj", "q_proj"]
    state = get_peft_model_state_dict(model)
    expected = {f"layers.{i}.self_attn.{p}" for i in range(TINY_MOE.layers) for p in ("q_proj", "o_proj")}
    assert adapter.weights.keys() == expected
    for path, (a, b) in adapter.weights.items():
        assert torch.equal(a, state[f"base_model.model.model.{path}.lora_A.weight"])
        assert torch.equal(b, state[f"base_model.model.model.{path}.lora_B.weight"])
        assert b.abs().sum() > 0


def _rewrite_config(folder, **changes):
    config = json.loads((folder / CONFIG_FILE).read_text())
    (folder / CONFIG_FILE).write_text(json.dumps({**config, **changes}))


def _rewrite_tensors(folder, change):
    tensors = load_file(str(folder / WEIGHTS_FILE))
    save_file(change(tensors), str(folder / WEIGHTS_FILE))


def _rename(tensors, old, new):
    return {k.replace(old, new): v for k, v in tensors.items()}


BAD_FOLDERS = {
    "no folder": (lambda f: f.rename(f.with_name("elsewhere")), "does not exist"),
    "no config": (lambda f: (f / CONFIG_FILE).unlink(), "no adapter_config.json"),
    "no weights": (lambda f: (f / WEIGHTS_FILE).unlink(), "no adapter_model.safetensors"),
    "bad json": (lambda f: (f / CONFIG_FILE).write_text("{"), "not valid JSON"),
    "not lora": (lambda f: _rewrite_config(f, peft_type="IA3"), "not 'LORA'"),
    "rslora": (lambda f: _rewrite_config(f, use_rslora=True), "use_rslora=True is not supported"),
    "dora": (lambda f: _rewrite_config(f, use_dora=True), "use_dora=True is not supported"),
    "rank pattern": (lambda f: _rewrite_config(f, rank_pattern={"q_proj": 2}), "rank_pattern"),
    "rank over limit": (lambda f: _rewrite_config(f, r=32), "rank 32, above the limit 16"),
    "foreign module": (
        lambda f: _rewrite_tensors(f, lambda t: _rename(t, "layers.0.", "layers.9.")),
        "'layers.9.self_attn.q_proj' is not a linear of arch tiny-moe",
    ),
    "foreign name": (
        lambda f: _rewrite_tensors(f, lambda t: _rename(t, "base_model.model.model.", "")),
        "is not a LoRA weight of the base model",
    ),
    "unpaired": (
        lambda f: _rewrite_tensors(
            f, lambda t: {k: v for k, v in t.items() if "layers.1.self_attn.q_proj.lora_B" not in k}
        ),
        "has lora_A without its pair",
    ),
    "rank mismatch": (lambda f: _rewrite_config(f, r=2), "with r=2 needs [2, 256]"),
}


@pytest.mark.parametrize("case", sorted(BAD_FOLDERS))
def test_bad_folders_are_refused_clearly(tmp_path, case):
    spoil, message = BAD_FOLDERS[case]
    folder = write_peft(random_adapter(TINY_MOE, "kw", targets=["q_proj"]), tmp_path / "kw", "tiny-moe")
    spoil(folder)
    with pytest.raises(UserError) as caught:
        read_peft(folder, TINY_MOE, max_rank=16)
    assert message in str(caught.value)


def test_an_adapter_for_another_arch_is_refused(tmp_path):
    folder = write_peft(random_adapter(TINY_MOE, "kw"), tmp_path / "kw", "tiny-moe")
    with pytest.raises(UserError, match="is not a linear of arch tiny-mla|needs"):
        read_peft(folder, MLA_ARCH, max_rank=16)
