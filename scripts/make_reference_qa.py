"""Make the built-in dataset `cpython-reference-qa`: questions about CPython's language reference, each with a short
exact answer, as chat rows, extracted deterministically from the packaged corpus.

    .venv/bin/python scripts/make_reference_qa.py          # writes adapt/builtin/cpython-reference-qa.jsonl
    .venv/bin/python scripts/make_reference_qa.py --check  # exit 1 when the shipped file is not this script's output

The corpus is `engine/assets/corpus/python-reference.txt` (CPython 3.11.7's reference topics, PSF licence; see the
README beside it): documents separated by a form feed, each a section whose first line is its title. Three kinds of
question, each answered by a name that appears in the corpus, so exact match is a fair score:

1. `symbol`: "Which section of the Python language reference defines the grammar symbol "X"?" -> the section
   title, for every symbol on the left of `::=` that one section only defines;
2. `method`: "Which method does the Python language reference describe as: "first sentence"?" -> the method's
   dotted name (`str.lstrip`, `object.__len__`), for every method signature alone above its description (a first
   sentence of 4-40 words), when no other method has the same first sentence;
3. `sentence`: "Which section of the Python language reference says: "sentence"?" -> the section title, for
   prose sentences of 8-40 words that appear in one section only, at most `SENTENCES_PER_SECTION` per section
   (picked by `random.Random(SEED)`, so the big sections do not drown the small ones).

Each row is `{"messages": [system, user question, assistant answer]}`; the rows are in that order (kinds, then the
corpus's order), with duplicates (the same question) dropped. Running the script again writes the same bytes.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "src" / "matrixstack" / "engine" / "assets" / "corpus" / "python-reference.txt"
OUT = ROOT / "src" / "matrixstack" / "adapt" / "builtin" / "cpython-reference-qa.jsonl"
DOC_SEPARATOR = "\n\n\f\n\n"
SEED = 0
SENTENCES_PER_SECTION = 40
MIN_WORDS, MAX_WORDS = 8, 40
MIN_METHOD_WORDS = 4  # a method's first sentence is often short ("Return the number of items.")
SYSTEM = "Answer questions about the Python language reference with the exact name only."
REFERENCE = "the Python language reference"
SYMBOL = re.compile(r"^\s+([A-Za-z_][\w]*)\s+::=", re.MULTILINE)
SIGNATURE = re.compile(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)\(.*\)$")
SENTENCE_END = re.compile(r'(?<=[.!?])\s+(?=[A-Z"])')
UNDERLINE = set("*=-^")


def sections(corpus: str) -> list[tuple[str, str]]:
    """Return (title, text) of each reference section of the corpus, in its order, each title once (the Zen of
    Python, the first document, is not a section)."""
    found: dict[str, str] = {}
    for document in corpus.split(DOC_SEPARATOR)[1:]:
        title = document.splitlines()[0].strip()
        found.setdefault(title, document)
    return list(found.items())


def paragraphs(text: str) -> list[list[str]]:
    """Return the blocks of non-blank lines of `text`."""
    blocks, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line)
        elif current:
            blocks.append(current)
            current = []
    return blocks + ([current] if current else [])


def sentences(block: list[str]) -> list[str]:
    """Return the sentences of a prose block (one indentation of 0 or 3 columns, no heading, grammar or table), []
    for anything else."""
    indents = {len(line) - len(line.lstrip()) for line in block}
    text = " ".join(line.strip() for line in block)
    if indents not in ({0}, {3}) or any(set(line.strip()) <= UNDERLINE for line in block):
        return []
    if "::=" in text or "|" in text or text.startswith(">>>"):
        return []
    return SENTENCE_END.split(text)


def is_question_sentence(sentence: str, min_words: int = MIN_WORDS) -> bool:
    """Return whether a sentence can stand alone as a question's quote: `min_words` to MAX_WORDS words, capitalised,
    ending with '.'."""
    words = sentence.split()
    return min_words <= len(words) <= MAX_WORDS and sentence[0].isupper() and sentence.endswith(".")


def symbol_pairs(parts: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Return (question, section title) for every grammar symbol one section only defines."""
    where: dict[str, set[str]] = defaultdict(set)
    order: list[str] = []
    for title, text in parts:
        for symbol in SYMBOL.findall(text):
            order += [] if symbol in where else [symbol]
            where[symbol].add(title)
    return [
        (f'Which section of {REFERENCE} defines the grammar symbol "{symbol}"?', next(iter(where[symbol])))
        for symbol in order
        if len(where[symbol]) == 1
    ]


def method_pairs(parts: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Return (question, method name) for every method signature alone above its description, when no other method
    has the same first sentence."""
    found: list[tuple[str, str]] = []
    for _, text in parts:
        lines = text.splitlines()
        for i in range(1, len(lines) - 2):
            signature = SIGNATURE.match(lines[i])
            if not signature or SIGNATURE.match(lines[i - 1]) or lines[i + 1] or not lines[i + 2].startswith("   "):
                continue
            block = []
            for line in lines[i + 2 :]:
                if not line.strip():
                    break
                block.append(line)
            first = sentences(block)[:1]
            if first and is_question_sentence(first[0], MIN_METHOD_WORDS):
                found.append((first[0], signature.group(1)))
    names: dict[str, set[str]] = defaultdict(set)
    for description, name in found:
        names[description].add(name)
    return [
        (f'Which method does {REFERENCE} describe as: "{description}"?', name)
        for description, name in found
        if len(names[description]) == 1
    ]


def sentence_pairs(parts: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Return (question, section title) for prose sentences found in one section only, at most
    SENTENCES_PER_SECTION per section (a seeded sample, kept in the corpus's order)."""
    where: dict[str, set[str]] = defaultdict(set)
    by_section: dict[str, list[str]] = defaultdict(list)
    for title, text in parts:
        for block in paragraphs(text):
            for sentence in sentences(block):
                if is_question_sentence(sentence):
                    where[sentence].add(title)
                    by_section[title].append(sentence)
    rng = random.Random(SEED)
    pairs = []
    for title, _ in parts:
        unique = list(dict.fromkeys(s for s in by_section[title] if len(where[s]) == 1))
        kept = set(rng.sample(unique, min(SENTENCES_PER_SECTION, len(unique))))
        pairs += [(f'Which section of {REFERENCE} says: "{s}"?', title) for s in unique if s in kept]
    return pairs


def rows(corpus: str) -> list[dict]:
    """Return the dataset's chat rows, made from the corpus text (see the module docstring)."""
    parts = sections(corpus)
    seen: set[str] = set()
    made = []
    for question, answer in [*symbol_pairs(parts), *method_pairs(parts), *sentence_pairs(parts)]:
        if question in seen:
            continue
        seen.add(question)
        messages = [("system", SYSTEM), ("user", question), ("assistant", answer)]
        made.append({"messages": [{"role": role, "content": content} for role, content in messages]})
    return made


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the shipped file is up to date")
    args = parser.parse_args()
    made = rows(CORPUS.read_text(encoding="utf-8"))
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in made)
    if args.check:
        same = OUT.read_text(encoding="utf-8") == text
        print(f"{OUT.name}: {'up to date' if same else 'differs from this script output; run it'}")
        return 0 if same else 1
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT} ({len(made)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
