"""`matrixstack model export|add|list|show|remove`: tiny-moe as a Hugging Face folder, and local Hugging Face
folders registered under a name that then works wherever an arch is named (plan, the engine's loading, shapes).
The transformers checks run transformers in vLLM's venv (tests/hf_reference.py; it is not a project dependency)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jinja2
import pytest
import torch
import yaml
from safetensors.torch import load_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from matrixstack.arch import load_arch
from matrixstack.engine import PACKAGED_WEIGHTS, weights_or_packaged
from matrixstack.engine.hf_export import glm4_moe_config, safetensors_header
from matrixstack.engine.hf_folder import lanes_for
from matrixstack.engine.loading import load_model
from matrixstack.engine.model import MoETransformer, greedy_generate
from matrixstack.engine.tokenizer import CHAT_TEMPLATE, Tokenizer
from matrixstack.engine.weights import save_weights
from matrixstack.errors import UserError
from matrixstack.stack.export import default_shape
from matrixstack.stack.spec import parse_shape
from matrixstack.stack.validate import check_shape

PACKAGED = PACKAGED_WEIGHTS["tiny-moe"]
HF_CONFIGS = Path(__file__).parent / "data" / "hf_configs"
HF_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
PROMPT = "def fibonacci(n):"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"}]


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """Every test gets its own data directory, so its registry starts empty."""
    monkeypatch.setenv("MATRIXSTACK_HOME", str(tmp_path / "home"))


@pytest.fixture
def exported(cli, tmp_path) -> Path:
    out = tmp_path / "tiny-moe-hf"
    result = cli("model", "export", "tiny-moe", "--format", "hf", "--out", str(out))
    assert result.exit_code == 0, result.output
    return out


def _shapes(path: Path) -> dict[str, tuple[str, list[int]]]:
    header = safetensors_header(path)
    return {name: (e["dtype"], e["shape"]) for name, e in header.items() if name != "__metadata__"}


def test_export_writes_a_glm4_moe_folder_with_the_packaged_tensors(exported):
    assert {p.name for p in exported.iterdir()} == HF_FILES
    config = json.loads((exported / "config.json").read_text())
    arch = load_arch("tiny-moe")
    assert config["architectures"] == ["Glm4MoeForCausalLM"] and config["model_type"] == "glm4_moe"
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (256, 4, 4096)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 64)
    assert (config["n_routed_experts"], config["num_experts_per_tok"], config["n_shared_experts"]) == (8, 2, 1)
    assert config["first_k_dense_replace"] == 1 and config["partial_rotary_factor"] == 1.0
    assert config["rope_parameters"]["rope_theta"] == arch.rope_theta and config["tie_word_embeddings"] is True
    assert (config["torch_dtype"], config["bos_token_id"], config["eos_token_id"]) == ("bfloat16", 0, 1)
    shapes = _shapes(exported / "model.safetensors")
    assert shapes == {**_shapes(PACKAGED / "model.safetensors"), "lm_head.weight": ("BF16", [4096, 256])}
    assert shapes["model.layers.1.mlp.experts.7.down_proj.weight"] == ("BF16", [256, 128])
    assert shapes["model.layers.1.mlp.gate.e_score_correction_bias"][1] == [8]
    tensors = load_file(exported / "model.safetensors")  # tied, yet written: vLLM's Glm4Moe reads its own LM head
    assert torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])
    tokenizer_config = json.loads((exported / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (tokenizer_config["bos_token"], tokenizer_config["eos_token"]) == ("<|bos|>", "<|eos|>")
    assert json.loads((exported / "generation_config.json").read_text()) == {"bos_token_id": 0, "eos_token_id": 1}


def test_the_exported_tokenizer_and_template_are_the_engines(exported):
    ours = Tokenizer.from_file(PACKAGED / "tokenizer.json")
    theirs = HFTokenizer.from_file(str(exported / "tokenizer.json"))
    assert theirs.encode(PROMPT).ids == ours.encode(PROMPT, add_bos=True)  # libraries add <|bos|> by default
    assert Tokenizer.from_file(exported / "tokenizer.json").encode(PROMPT) == ours.encode(PROMPT)
    template = json.loads((exported / "tokenizer_config.json").read_text())["chat_template"]
    assert template == CHAT_TEMPLATE
    for add in (True, False):
        rendered = jinja2.Template(template).render(messages=CHAT, add_generation_prompt=add)
        assert rendered == ours.apply_chat_template(CHAT, add_generation_prompt=add)


def test_the_exported_folder_loads_into_the_engine_with_the_packaged_logits(exported):
    ids = torch.arange(40) * 37 % 4096
    packaged, _ = load_model("tiny-moe")
    loaded, _ = load_model("tiny-moe", exported)
    with torch.no_grad():
        assert torch.equal(loaded.reference_forward(ids), packaged.reference_forward(ids))


def test_export_refuses_a_folder_with_files_unless_forced_and_bad_input(cli, exported, tmp_path):
    again = cli("model", "export", "tiny-moe", "--format", "hf", "--out", str(exported))
    assert again.exit_code == 2 and "is not an empty folder" in again.output and "--force" in again.output
    assert cli("model", "export", "tiny-moe", "--format", "hf", "--out", str(exported), "--force").exit_code == 0
    onnx = cli("model", "export", "tiny-moe", "--format", "onnx", "--out", str(tmp_path / "x"))
    assert onnx.exit_code == 2 and "--format 'onnx' is not one of hf" in onnx.output
    none = cli("model", "export", "deepseek-v3", "--format", "hf", "--out", str(tmp_path / "y"))
    assert none.exit_code == 2 and "ships no weights" in none.output
    z = str(tmp_path / "z")
    mla = cli("model", "export", "deepseek-v3", "--weights", str(PACKAGED), "--format", "hf", "--out", z)
    assert mla.exit_code == 2 and "cannot be exported as Glm4MoeForCausalLM: attention is MLA" in mla.output
    assert "Traceback" not in mla.output and not (tmp_path / "y").exists() and not (tmp_path / "z").exists()
    wider = tmp_path / "wider.yaml"
    wider.write_text(yaml.safe_dump({**load_arch("tiny-moe").model_dump(), "vocab_size": 8192}))
    other = cli("model", "export", str(wider), "--weights", str(PACKAGED), "--format", "hf", "--out", z)
    assert other.exit_code == 2 and "model.embed_tokens.weight is [4096, 256], expected [8192, 256]" in other.output
    afile = cli("model", "export", "tiny-moe", "--format", "hf", "--out", str(wider))
    assert afile.exit_code == 2 and "is a file; give a folder" in afile.output


def test_add_list_show_remove_round_trip(cli, exported):
    added = cli("model", "add", str(exported), "--name", "tiny-hf")
    assert added.exit_code == 0, added.output
    assert "registered model tiny-hf (Glm4MoeForCausalLM): lanes engine, vllm" in added.output
    rows = json.loads(cli("model", "list", "--json").stdout)
    assert rows == [
        {
            "name": "tiny-hf",
            "folder": str(exported.resolve()),
            "architecture": "Glm4MoeForCausalLM",
            "model_type": "glm4_moe",
            "lanes": ["engine", "vllm"],
            "engine_blockers": [],
        }
    ]
    shown = json.loads(cli("model", "show", "tiny-hf", "--json").stdout)
    tiny = load_arch("tiny-moe").model_dump()
    assert shown["arch"] == {**tiny, "name": "tiny-hf", "source": shown["arch"]["source"]}
    assert "tiny-hf" in cli("model", "list").output and "engine, vllm" in cli("model", "show", "tiny-hf").output
    taken = cli("model", "add", str(exported), "--name", "tiny-hf")
    assert taken.exit_code == 2 and "already registered" in taken.output
    builtin = cli("model", "add", str(exported), "--name", "tiny-moe")
    assert builtin.exit_code == 2 and "built-in arch's name" in builtin.output
    removed = cli("model", "remove", "tiny-hf")
    assert removed.exit_code == 0 and (exported / "config.json").is_file()
    assert json.loads(cli("model", "list", "--json").stdout) == []
    gone = cli("model", "show", "tiny-hf")
    assert gone.exit_code == 2 and "no registered model 'tiny-hf'" in gone.output


def test_a_registered_name_plans_and_loads_as_an_arch(cli, exported):
    assert cli("model", "add", str(exported), "--name", "tiny-hf").exit_code == 0
    plan = cli("plan", "tiny-hf", "--fabric", "local", "--precision", "bf16", "--json")
    assert plan.exit_code == 0, plan.output
    assert json.loads(plan.stdout)["arch"] == "tiny-hf"
    assert weights_or_packaged("tiny-hf", None, "unused") == exported.resolve()
    ours, tokenizer = load_model("tiny-hf")  # what `engine serve tiny-hf` loads
    packaged, _ = load_model("tiny-moe")
    ids = tokenizer.encode(PROMPT, add_bos=True)
    assert greedy_generate(ours, ids, 8) == greedy_generate(packaged, ids, 8)
    unknown = cli("plan", "nope", "--fabric", "local", "--precision", "bf16")
    assert unknown.exit_code == 2 and "registered models: tiny-hf" in unknown.output


def _folder_like(exported: Path, tmp_path: Path, drop: str = "", **config) -> Path:
    folder = tmp_path / "other"
    shutil.copytree(exported, folder)
    if drop:
        for path in folder.glob(drop):
            path.unlink()
    if config:
        path = folder / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return folder


@pytest.mark.parametrize(
    ("drop", "message"),
    [
        ("config.json", "it has no config.json"),
        ("*.safetensors", "it has no *.safetensors weights"),
        ("tokenizer.json", "it has no tokenizer.json"),
    ],
)
def test_add_names_what_a_folder_lacks_and_how_to_fill_it(cli, exported, tmp_path, drop, message):
    result = cli("model", "add", str(_folder_like(exported, tmp_path, drop)), "--name", "x")
    assert result.exit_code == 2 and message in result.output
    assert "huggingface-cli download REPO --local-dir DIR" in result.output and "Traceback" not in result.output
    missing = cli("model", "add", str(tmp_path / "nowhere"), "--name", "x")
    assert missing.exit_code == 2 and "is not a folder" in missing.output


def test_an_unsupported_architecture_names_the_lanes_that_could_serve_it(cli, exported, tmp_path):
    folder = _folder_like(exported, tmp_path, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    result = cli("model", "add", str(folder), "--name", "gpt")
    assert result.exit_code == 2
    assert "architecture GPT2LMHeadModel (model_type 'gpt2') is not one MatrixStack can import" in result.output
    assert "lanes that could serve it: upstream" in result.output and "glm4_moe" in result.output


def test_a_model_the_builtin_engine_cannot_run_is_served_by_vllm_only(cli, exported, tmp_path):
    folder = _folder_like(exported, tmp_path, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    added = cli("model", "add", str(folder), "--name", "long")
    assert added.exit_code == 0, added.output
    assert "lanes vllm" in added.output and "RoPE scaling 'yarn'" in added.output
    assert json.loads(cli("model", "show", "long", "--json").stdout)["lanes"] == ["vllm"]
    with pytest.raises(UserError, match=r"not one the builtin engine runs: RoPE scaling 'yarn'.*lanes that can serve"):
        load_model("long")


def test_arch_import_reads_transformers_5_rope_parameters(tmp_path, exported):
    config = json.loads((exported / "config.json").read_text())
    del config["rope_theta"], config["torch_dtype"]
    config["rope_parameters"]["rope_theta"], config["dtype"] = 5e5, "float32"
    (tmp_path / "config.json").write_text(json.dumps(config))
    from matrixstack.arch.hf_import import import_hf_config

    arch, text = import_hf_config(tmp_path / "config.json")
    assert (arch.rope_theta, arch.native_dtype) == (5e5, "fp32")
    assert 'config.json "rope_parameters" "rope_theta"' in text


@pytest.mark.slow
def test_transformers_loads_the_export_with_the_engines_greedy_tokens(exported, hf_reference):
    """The exported folder in transformers' Auto classes (run in vLLM's venv)."""
    theirs = hf_reference({"folder": str(exported), "generate": {"prompt": PROMPT, "max_new_tokens": 16, "chat": CHAT}})
    ours, tokenizer = load_model("tiny-moe")
    ids = theirs["prompt_ids"]
    assert ids == tokenizer.encode(PROMPT, add_bos=True)
    assert theirs["generated_ids"] == greedy_generate(ours, ids, 16)
    assert theirs["chat_rendered"] == tokenizer.apply_chat_template(CHAT)


def test_a_shape_deployment_may_name_a_registered_model(cli, exported, tmp_path):
    long = _folder_like(exported, tmp_path, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    assert cli("model", "add", str(exported), "--name", "tiny-hf").exit_code == 0
    assert cli("model", "add", str(long), "--name", "long").exit_code == 0
    data = default_shape().dump()
    data["deployments"][0].update(arch="tiny-hf", slice={"devices": 1}, pins={})
    assert [d.name for d in check_shape(parse_shape(data, "test shape"))] == [data["deployments"][0]["name"]]
    data["deployments"][0]["arch"] = "long"
    with pytest.raises(UserError, match=r"model long .* is not one the builtin engine runs.*engine: vllm"):
        check_shape(parse_shape(data, "test shape"))


@pytest.mark.parametrize(
    ("config", "lanes", "reasons"),
    [
        ("qwen3-8b.json", ["engine", "vllm"], []),
        ("mixtral-8x7b.json", ["engine", "vllm"], []),
        ("qwen2.5-7b-instruct.json", ["engine", "vllm"], []),  # sliding_window given, use_sliding_window false
        ("llama-3.1-70b.json", ["vllm"], ["RoPE scaling 'llama3'"]),
        ("deepseek-v3.json", ["vllm"], ["RoPE scaling 'yarn'", "quantized weights (fp8)"]),
    ],
)
def test_lanes_follow_what_the_builtin_engine_runs(exported, tmp_path, config, lanes, reasons):
    folder = _folder_like(exported, tmp_path)  # the engine's tokenizer, so only config.json decides
    shutil.copy(HF_CONFIGS / config, folder / "config.json")
    found_lanes, blockers = lanes_for(json.loads((folder / "config.json").read_text()), folder)
    assert found_lanes == lanes
    assert [r for r in reasons if not any(r in b for b in blockers)] == [] and len(blockers) == len(reasons)


def test_a_public_tokenizer_leaves_vllm_only(exported, tmp_path):
    folder = _folder_like(exported, tmp_path)
    HFTokenizer(models.WordLevel({"hello": 0, "<unk>": 1}, unk_token="<unk>")).save(str(folder / "tokenizer.json"))
    lanes, blockers = lanes_for(json.loads((folder / "config.json").read_text()), folder)
    assert lanes == ["vllm"] and "lacks the special tokens" in blockers[0]


@pytest.mark.slow
@pytest.mark.parametrize(("qkv_bias", "qk_norm"), [(True, False), (False, True)])
def test_glm4_moe_attention_options_match_transformers(tmp_path, hf_reference, qkv_bias, qk_norm):
    """The config.json options the import maps to qkv_bias / qk_norm are the engine's (transformers run in vLLM's
    venv), so a GLM-4.5 folder using them is one the builtin engine runs."""
    tiny = load_arch("tiny-moe")
    arch = tiny.model_copy(
        update={"attention": tiny.attention.model_copy(update=dict(qkv_bias=qkv_bias, qk_norm=qk_norm))}
    )
    torch.manual_seed(0)
    ours = MoETransformer(arch).eval()
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if "norm" in name or "bias" in name:  # away from their initial ones and zeros
                param.add_(torch.randn_like(param) * 0.1)
    save_weights(ours, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(glm4_moe_config(arch, "float32")))
    ids = torch.arange(33) * 37 % arch.vocab_size
    hf_reference({"folder": str(tmp_path), "logits": {"ids": ids.tolist(), "out": str(tmp_path / "hf.safetensors")}})
    with torch.no_grad():
        expected = ours.reference_forward(ids)
    torch.testing.assert_close(load_file(tmp_path / "hf.safetensors")["logits"], expected, atol=1e-4, rtol=0)
