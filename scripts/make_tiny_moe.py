"""Make tiny-moe's weights and tokenizer: train a byte-level BPE tokenizer and the model on the shipped corpus.

    .venv/bin/python scripts/make_tiny_moe.py                    # writes src/matrixstack/engine/assets/tiny-moe/
    .venv/bin/python scripts/make_tiny_moe.py --rebuild-corpus   # first re-assemble the corpus from this Python

Steps: (1) the corpus is `engine/assets/corpus/python-reference.txt` (see the README beside it); (2) a BPE
tokenizer with the arch's vocab_size is trained on it; (3) the model is initialised with torch.manual_seed(SEED)
and trained with AdamW (bf16 autocast, fp32 master weights) on next-token loss over random windows of the corpus;
the MoE routers' correction biases are nudged towards balanced expert load after each step (DeepSeek-V3's
auxiliary-loss-free balancing); (4) the weights are saved in bf16 with `save_weights`, and the final loss and a
greedy sample are printed.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from matrixstack.arch import load_arch
from matrixstack.engine import ASSETS_DIR
from matrixstack.engine.loading import load_model
from matrixstack.engine.model import MoETransformer, greedy_generate
from matrixstack.engine.moe import Router
from matrixstack.engine.tokenizer import BOS, EOS, SPECIAL_TOKENS, Tokenizer
from matrixstack.engine.weights import save_weights

SEED = 0
CORPUS = ASSETS_DIR / "corpus" / "python-reference.txt"
OUT_DIR = ASSETS_DIR / "tiny-moe"
DOC_SEPARATOR = "\n\n\f\n\n"  # between documents in the corpus file
SAMPLE_PROMPT = (
    'The "for" statement is used to iterate over the elements of a sequence\n'
    "(such as a string, tuple or list) or other iterable object:"
)


def assemble_corpus() -> str:
    """Return the corpus text: the Zen of Python, then every topic of this CPython's `pydoc_data.topics`."""
    import codecs
    import contextlib
    import io
    import pydoc_data.topics

    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen
        import this

    zen = codecs.decode(this.s, "rot13")
    topics = pydoc_data.topics.topics
    return DOC_SEPARATOR.join([zen, *(topics[name].strip() for name in sorted(topics))]) + "\n"


def train_tokenizer(text: str, vocab_size: int) -> HFTokenizer:
    """Return a byte-level BPE tokenizer with `vocab_size` tokens (special tokens included) trained on `text`."""
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(text.split(DOC_SEPARATOR), trainer=trainer)
    return tokenizer


def corpus_tokens(tokenizer: Tokenizer, text: str) -> torch.Tensor:
    """Return the corpus as one int64 stream: each document as <|bos|> text <|eos|>."""
    ids: list[int] = []
    for doc in text.split(DOC_SEPARATOR):
        ids += tokenizer.encode(f"{BOS}{doc}{EOS}")
    return torch.tensor(ids)


def balance_routers(model: MoETransformer, step_size: float) -> list:
    """Install hooks that move each router's correction bias by `step_size` towards equal expert load; returns
    the hook handles."""

    def hook(router: Router, inputs, output) -> None:
        load = torch.bincount(output[0].flatten(), minlength=router.weight.shape[0]).float()
        with torch.no_grad():
            router.e_score_correction_bias += step_size * torch.sign(load.mean() - load)

    return [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, Router)]


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Return the learning rate at `step`: linear warm-up, then cosine decay to a tenth of `peak`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model: MoETransformer, data: torch.Tensor, args: argparse.Namespace) -> float:
    """Train `model` in place on random windows of `data`; returns the mean loss of the last 20 steps."""
    generator = torch.Generator().manual_seed(SEED)
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    hooks = balance_routers(model, args.balance_step)
    losses: list[float] = []
    start = time.monotonic()
    for step in range(args.steps):
        offsets = torch.randint(0, len(data) - args.seq_len - 1, (args.batch,), generator=generator)
        window = torch.stack([data[o : o + args.seq_len + 1] for o in offsets.tolist()])
        with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 matmuls: ~10x faster than fp32 on this CPU
            logits = model.reference_forward(window[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten())
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.3f}  {time.monotonic() - start:6.0f} s", flush=True)
    for handle in hooks:
        handle.remove()
    return sum(losses[-20:]) / len(losses[-20:])


def main() -> None:
    """Build the corpus (if asked), the tokenizer and the weights, then print the final loss and a sample."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rebuild-corpus", action="store_true", help="re-assemble the corpus from this Python")
    parser.add_argument("--steps", type=int, default=1200, help="training steps")
    parser.add_argument("--batch", type=int, default=16, help="windows per step")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per window")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=50, help="warm-up steps")
    parser.add_argument("--balance-step", type=float, default=1e-3, help="router bias step per training step")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder")
    args = parser.parse_args()

    if args.rebuild_corpus:
        CORPUS.write_text(assemble_corpus())
    text = CORPUS.read_text()
    arch = load_arch("tiny-moe")
    args.out.mkdir(parents=True, exist_ok=True)
    train_tokenizer(text, arch.vocab_size).save(str(args.out / "tokenizer.json"))
    tokenizer = Tokenizer.from_file(args.out / "tokenizer.json")
    data = corpus_tokens(tokenizer, text)
    print(f"corpus: {len(text):,} characters, {len(data):,} tokens, vocab {tokenizer.vocab_size}")

    torch.manual_seed(SEED)
    model = MoETransformer(arch)
    final_loss = train(model, data, args)
    save_weights(model.to(torch.bfloat16), args.out / "model.safetensors")
    print(f"final loss (mean of the last 20 steps): {final_loss:.3f}")

    trained, tokenizer = load_model("tiny-moe", args.out)
    sample = greedy_generate(trained, tokenizer.encode(SAMPLE_PROMPT, add_bos=True), 20)
    print(f"greedy sample: {SAMPLE_PROMPT + tokenizer.decode(sample)!r}")


if __name__ == "__main__":
    main()
