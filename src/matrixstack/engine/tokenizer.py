"""A byte-level BPE tokenizer (the `tokenizers` package) with MatrixStack's special tokens and chat template.

Special tokens: `<|bos|>` starts a document, `<|eos|>` ends one and ends each chat turn; `<|system|>`,
`<|user|>` and `<|assistant|>` open a chat turn. Any text round-trips exactly (byte-level: no unknown tokens).

Chat template (`apply_chat_template`): messages `[{"role": ..., "content": ...}]` with role system, user or
assistant become

    <|bos|><|system|>\\n{content}<|eos|>\\n<|user|>\\n{content}<|eos|>\\n...<|assistant|>\\n

the last `<|assistant|>\\n` only when `add_generation_prompt`; a reply ends at `<|eos|>`. `CHAT_TEMPLATE` is the
same template in Jinja, as Hugging Face's tokenizer_config.json carries it (transformers and vLLM render it).

`encode` releases the GIL while it works (the `tokenizers` batch call does; the single one does not), so a long
prompt tokenised on a worker thread does not stop the event loop or the engine's step loop. `max_token_chars` is
the most characters one token decodes to: a text of C characters has at least C / max_token_chars tokens, which
lets a server refuse a prompt that cannot fit without tokenising it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from matrixstack.errors import UserError

BOS, EOS = "<|bos|>", "<|eos|>"
ROLES = ("system", "user", "assistant")
SPECIAL_TOKENS = [BOS, EOS, *(f"<|{role}|>" for role in ROLES)]
CHAT_TEMPLATE = (
    "{{ '<|bos|>' }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('message role ' + message['role'] + ' is not one of system, user, assistant') }}{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|eos|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


class Tokenizer:
    """Encode and decode text; `bos_id`, `eos_id` and `vocab_size` describe the vocabulary."""

    def __init__(self, backend: HFTokenizer):
        self.backend = backend
        missing = [token for token in SPECIAL_TOKENS if backend.token_to_id(token) is None]
        if missing:
            raise UserError(f"tokenizer lacks the special tokens {missing}; train it with SPECIAL_TOKENS")
        self.bos_id = backend.token_to_id(BOS)
        self.eos_id = backend.token_to_id(EOS)
        self.vocab_size = backend.get_vocab_size()

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Return the tokenizer saved at `path` (a tokenizer.json); raises UserError when it cannot be read."""
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as exc:  # tokenizers raises a bare Exception for unreadable files
            raise UserError(f"cannot load tokenizer {path}: {exc}") from None

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Return the token ids of `text` (special-token strings in it become their ids), after `<|bos|>` if
        `add_bos`."""
        ids = self.backend.encode_batch([text], add_special_tokens=False)[0].ids  # the batch call releases the GIL
        return [self.bos_id, *ids] if add_bos else ids

    @cached_property
    def max_token_chars(self) -> int:
        """Return the most characters one token of the vocabulary decodes to (special tokens included; a token
        that ends inside a UTF-8 character counts as one)."""
        ids = [[i] for i in range(self.vocab_size)]
        return max(len(text) for text in self.backend.decode_batch(ids, skip_special_tokens=False))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Return the text of `ids`, without special tokens unless `skip_special_tokens` is False."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        """Return the prompt text for chat `messages` (template in the module docstring)."""
        parts = [BOS]
        for message in messages:
            role = message.get("role")
            if role not in ROLES:
                raise UserError(f"message role {role!r} is not one of {', '.join(ROLES)}")
            parts.append(f"<|{role}|>\n{message.get('content', '')}{EOS}\n")
        if add_generation_prompt:
            parts.append("<|assistant|>\n")
        return "".join(parts)
