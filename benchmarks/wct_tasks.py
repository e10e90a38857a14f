"""Two tuning tasks from the Austen corpus, with fixed-seed held-out splits, and their metrics.

(a) domain: `{"text"}` windows of consecutive words from the five training novels; the metric is
perplexity on Persuasion (never trained on). (b) novel identification: a passage of three
consecutive sentences + "Which Jane Austen novel is this passage from?" -> the title; train and
test passages are disjoint; the metric is exact-match accuracy of ranking the six titles by the
log-likelihood of " <title>" + EOS given the prompt (argmax of the summed token log-probs, no
length normalisation; chance = 1/6). Knows the corpus and a causal LM's forward, not OWQ.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

from owq.builtin.corpus import HELD_OUT, read_novels

TITLES = {
    "sense_and_sensibility": "Sense and Sensibility",
    "pride_and_prejudice": "Pride and Prejudice",
    "mansfield_park": "Mansfield Park",
    "emma": "Emma",
    "northanger_abbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
QUESTION = "Which Jane Austen novel is this passage from?"
_HEADING = re.compile(
    r"^(CHAPTER|VOLUME|Chapter|Volume)\b|^[A-Z .,;:'-]+$|^[Bb]y Jane Austen|^\(\d+\)$"
)
_ABBREVIATIONS = ("Mr.", "Mrs.", "Dr.", "St.", "Col.", "Capt.", "Esq.")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')_]*\s+(?=[\"'(_]*[A-Z])")


@dataclass(frozen=True)
class NovelItem:
    prompt: str
    novel: str  # key of TITLES

    @property
    def completion(self) -> str:
        return " " + TITLES[self.novel]

    def record(self) -> dict:
        return {"prompt": self.prompt, "completion": self.completion}


def paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs, lines joined, headings (CHAPTER 3, titles) dropped."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        joined = " ".join(line.strip() for line in block.splitlines() if line.strip())
        if joined and not _HEADING.match(joined):
            out.append(re.sub(r"\s+", " ", joined))
    return out


def sentences(text: str) -> list[str]:
    """Sentences of the paragraphs; a split after "Mr." and the like is undone."""
    out = []
    for paragraph in paragraphs(text):
        for piece in _SENTENCE_END.split(paragraph):
            if out and out[-1].endswith(_ABBREVIATIONS) and not out[-1].endswith("\n"):
                out[-1] = f"{out[-1]} {piece.strip()}"
            elif piece.strip():
                out.append(piece.strip())
        out.append("\n")  # paragraph end: never merge across it
    return [s for s in out if s != "\n"]


# (a) domain ---------------------------------------------------------------------------------
def domain_windows(text: str, words: int) -> list[str]:
    """Non-overlapping windows of `words` consecutive words (the last partial one dropped)."""
    tokens = " ".join(paragraphs(text)).split()
    return [" ".join(tokens[i : i + words]) for i in range(0, len(tokens) - words + 1, words)]


def domain_task(seed: int, n_train: int, n_eval: int, words: int = 160):
    """(train, eval) `{"text"}` records from the five training novels; disjoint windows."""
    novels = read_novels()
    windows = [
        w for name, t in novels.items() if name != HELD_OUT for w in domain_windows(t, words)
    ]
    random.Random(seed).shuffle(windows)
    if len(windows) < n_train + n_eval:
        raise ValueError(f"only {len(windows)} windows for {n_train} + {n_eval}")
    records = [{"text": w} for w in windows]
    return records[:n_train], records[n_train : n_train + n_eval]


# (b) novel identification -------------------------------------------------------------------
def passages(text: str, per: int = 3, min_chars: int = 150, max_chars: int = 400) -> list[str]:
    """Consecutive, non-overlapping groups of `per` sentences within the length bounds."""
    sents = sentences(text)
    groups = (" ".join(sents[i : i + per]) for i in range(0, len(sents) - per + 1, per))
    return [g for g in groups if min_chars <= len(g) <= max_chars]


def prompt_for(passage: str) -> str:
    return f"{passage}\n{QUESTION}\nAnswer:"


def novel_id_task(seed: int, n_train: int, n_test: int) -> tuple[list[NovelItem], list[NovelItem]]:
    """(train, test) items, `n_train` and `n_test` per novel; no test passage is in training."""
    train, test = [], []
    for index, (name, text) in enumerate(read_novels().items()):
        found = passages(text)
        random.Random(seed * 101 + index).shuffle(found)
        if len(found) < n_train + n_test:
            raise ValueError(f"{name}: only {len(found)} passages for {n_train} + {n_test}")
        test += [NovelItem(prompt_for(p), name) for p in found[:n_test]]
        train += [NovelItem(prompt_for(p), name) for p in found[n_test : n_test + n_train]]
    random.Random(seed).shuffle(train)
    return train, test


@torch.no_grad()
def choice_logprobs(model, tokenizer, prompt: str, choices: list[str]) -> torch.Tensor:
    """Summed log-prob of each `choice` + EOS after `prompt`: float [C].

    The prompt runs once; its KV cache is repeated for the C continuations (right-padded).
    """
    prompt_ids = torch.tensor([tokenizer(prompt).input_ids])
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    conts = [tokenizer(c, add_special_tokens=False).input_ids + eos for c in choices]
    out = model(input_ids=prompt_ids, use_cache=True)
    first = out.logits[0, -1].float().log_softmax(-1)  # [V]
    cache = out.past_key_values
    cache.batch_repeat_interleave(len(choices))
    width = max(len(c) for c in conts)
    ids = torch.zeros(len(choices), width, dtype=torch.long)
    mask = torch.zeros(len(choices), prompt_ids.shape[1] + width, dtype=torch.long)
    mask[:, : prompt_ids.shape[1]] = 1
    for row, c in enumerate(conts):
        ids[row, : len(c)] = torch.tensor(c)
        mask[row, prompt_ids.shape[1] : prompt_ids.shape[1] + len(c)] = 1
    logp = model(input_ids=ids, attention_mask=mask, past_key_values=cache).logits
    logp = logp.float().log_softmax(-1)  # [C, W, V]
    scores = []
    for row, c in enumerate(conts):
        rest = sum(logp[row, j - 1, c[j]] for j in range(1, len(c)))
        scores.append(first[c[0]] + rest)
    return torch.stack(scores)


def title_accuracy(model, tokenizer, items: list[NovelItem]) -> float:
    """Exact-match accuracy of the top-ranked title over `items`."""
    names = list(TITLES)
    choices = [" " + TITLES[n] for n in names]
    hits = 0
    for item in items:
        best = int(choice_logprobs(model, tokenizer, item.prompt, choices).argmax())
        hits += names[best] == item.novel
    return hits / len(items)
