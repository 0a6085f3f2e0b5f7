"""Quality measures shared by the stages and the tests: task exact match and character similarity with greedy
decoding, perplexity."""
from __future__ import annotations

import math
from difflib import SequenceMatcher

import torch
from tqdm.auto import tqdm

from .data import chat_prompt


@torch.no_grad()
def generate_answers(model, tokenizer, chats: list[list[dict]], max_new_tokens: int = 32,
                     batch_size: int = 16) -> list[str]:
    """Greedy answers to each chat's prompt (every message but the last)."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    answers = []
    try:
        for i in tqdm(range(0, len(chats), batch_size), desc="generating answers", unit="batch"):
            prompts = [chat_prompt(tokenizer, chat) for chat in chats[i:i + batch_size]]
            batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            answers += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return [a.strip() for a in answers]


def answer_scores(answers: list[str], references: list[str]) -> dict[str, float | None]:
    """The share of answers equal to their reference (accuracy) and, as partial credit, their mean character
    similarity to it (difflib's ratio: 1 for the same text, 0 for nothing in common), so that an answer one
    digit off still counts for most of one. None for no answers."""
    if not answers:
        return {"accuracy": None, "similarity": None}
    pairs = list(zip(answers, references, strict=True))
    return {"accuracy": sum(a == r for a, r in pairs) / len(pairs),
            "similarity": sum(SequenceMatcher(None, a, r).ratio() for a, r in pairs) / len(pairs)}


def task_scores(model, tokenizer, chats: list[list[dict]], **kwargs) -> dict[str, float | None]:
    """answer_scores of the model's greedy answers to the chats' prompts against their last messages."""
    answers = generate_answers(model, tokenizer, chats, **kwargs)
    return answer_scores(answers, [chat[-1]["content"].strip() for chat in chats])


@torch.no_grad()
def perplexity(model, windows: list[list[int]]) -> float:
    """exp of the mean next-token loss over fixed windows of token ids."""
    losses = [model(input_ids=torch.tensor([w], device=model.device), labels=torch.tensor([w], device=model.device))
              .loss.float().item() for w in tqdm(windows, desc="perplexity", unit="window")]
    return math.exp(sum(losses) / len(losses))
