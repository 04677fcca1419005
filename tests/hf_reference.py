"""transformers' side of the tests that compare the builtin engine with it, run in vLLM's venv (which has torch and
transformers; MatrixStack's own venv has no transformers: its pins clash). It imports only the standard library,
torch, transformers and safetensors, never matrixstack.

Run as `<vLLM venv's python> tests/hf_reference.py '<JSON request>'`; the request names a local Hugging Face
folder (config.json plus safetensors, written by the test) and what to compute, in float32:
- {"folder", "logits": {"ids": [...], "out": PATH}}: the logits of one forward pass over `ids`, saved to the
  safetensors file PATH under the name "logits" ([len(ids), vocab], float32).
- {"folder", "generate": {"prompt", "max_new_tokens", "chat": [messages]}}: AutoTokenizer's ids of `prompt`, the
  greedy tokens AutoModelForCausalLM generates after them, and the chat template rendered for `chat` with the
  generation prompt, printed as JSON {"prompt_ids", "generated_ids", "chat_rendered"} on the last line of stdout.
"""

from __future__ import annotations

import json
import sys


def logits(folder: str, ids: list[int], out: str) -> None:
    """Save the logits of the folder's model over `ids` to the safetensors file `out` (name "logits")."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        found = model(torch.tensor([ids])).logits[0].float().contiguous()
    save_file({"logits": found}, out)


def generate(folder: str, prompt: str, max_new_tokens: int, chat: list[dict[str, str]]) -> dict:
    """Return {"prompt_ids", "generated_ids", "chat_rendered"}: the prompt's ids, the greedy tokens after them, and
    the chat template rendered for `chat` with the generation prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)
    rendered = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    return {"prompt_ids": ids, "generated_ids": out[0, len(ids) :].tolist(), "chat_rendered": rendered}


def main(request: dict) -> None:
    """Compute what `request` asks for (see the module docstring)."""
    if "logits" in request:
        logits(request["folder"], **request["logits"])
    else:
        print(json.dumps(generate(request["folder"], **request["generate"])))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
