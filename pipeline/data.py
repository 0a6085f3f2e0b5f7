"""Data shared by every stage: the built-in task, user datasets, chat formatting, calibration and held-out text."""
from __future__ import annotations

import calendar
import json
import logging
import os
import random
from pathlib import Path

from .config import ConfigError, DataConfig

log = logging.getLogger(__name__)

BUILTIN = "builtin"
TEMPLATES = (
    "Write the date {iso} in long form.",
    "Convert {iso} to a long-form date.",
    "Rewrite the ISO date {iso} the long way.",
)


def builtin_task(n: int, seed: int) -> list[dict]:
    """ISO dates to 'Month D, YYYY': exact answers a small model gets wrong until fine-tuned."""
    import datetime

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        day = datetime.date(1900, 1, 1) + datetime.timedelta(days=rng.randrange(200 * 365))
        answer = f"{calendar.month_name[day.month]} {day.day}, {day.year}"
        rows.append({"instruction": rng.choice(TEMPLATES).format(iso=day.isoformat()), "input": "",
                     "output": answer})
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    """Written whole, then renamed: under DDP every rank writes the same file and readers see one copy."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    with tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def to_messages(row: dict) -> list[dict]:
    """Alpaca rows (instruction/input/output) and chat rows (messages) as one chat, ending with the answer."""
    if "messages" in row:
        messages = list(row["messages"])
        if not messages or messages[-1].get("role") != "assistant":
            raise ConfigError("data: every 'messages' row must end with an assistant message")
        return messages
    prompt = row["instruction"] if not row.get("input") else f"{row['instruction']}\n\n{row['input']}"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]


def load_rows(data: DataConfig, seed: int, workdir: Path):
    """The dataset as a `datasets.Dataset` of chats, from the built-in task, a local file or the HF hub."""
    import datasets

    source = data.source
    if source == BUILTIN:
        source = str(write_jsonl(builtin_task(data.builtin_examples, seed), workdir / "builtin_task.jsonl"))
    suffix = Path(source).suffix
    if suffix in (".jsonl", ".json", ".parquet"):
        ds = datasets.load_dataset("parquet" if suffix == ".parquet" else "json", data_files=source, split="train")
    else:
        ds = datasets.load_dataset(source, split=data.split)
    if "messages" not in ds.column_names and not {"instruction", "output"} <= set(ds.column_names):
        raise ConfigError(f"data.source={data.source!r}: expected 'messages' or 'instruction'/'output' columns, "
                          f"found {ds.column_names}")
    return ds.map(lambda row: {"messages": to_messages(row)}, remove_columns=ds.column_names)


def split_rows(ds, heldout: int, seed: int):
    if heldout == 0:
        return ds, ds.select([])
    parts = ds.train_test_split(test_size=heldout, seed=seed)
    return parts["train"], parts["test"]


# The chat template for tokenizers that have none (base models, GPT-NeoX-style tokenizers): Zephyr's plain-text
# role markers, every turn ended by the tokenizer's EOS token, so that the fine-tuned model learns to stop on the
# token that transformers and vLLM stop generation on. It is saved with every checkpoint the pipeline writes.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    """The prompt a model sees before it answers the last message (the generation prompt included)."""
    return tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)


def tokenize_chat(tokenizer, messages: list[dict]) -> dict:
    """input_ids for the whole chat; labels only on the final answer (the prompt is masked with -100)."""
    prompt = chat_prompt(tokenizer, messages)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise ConfigError("the tokenizer's chat template does not render the prompt as a prefix of the chat")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    return {"input_ids": prompt_ids + answer_ids, "labels": [-100] * len(prompt_ids) + answer_ids}


def pydoc_texts(heldout: bool) -> list[str]:
    """Python's own documentation topics: every fifth is held out for perplexity, never used for calibration."""
    from pydoc_data.topics import topics

    return [topics[k] for i, k in enumerate(sorted(topics)) if (i % 5 == 0) == heldout]


def token_windows(tokenizer, texts: list[str], seq_len: int) -> list[list[int]]:
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return [ids[i:i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]


def calibration_windows(tokenizer, source: str, chats: list[list[dict]], n: int, seq_len: int,
                        seed: int) -> list[list[int]]:
    """n windows of seq_len tokens from pydoc text, the training chats, or half of each ('mixed')."""
    pools = {}
    if source in ("pydoc", "mixed"):
        pools["pydoc"] = token_windows(tokenizer, pydoc_texts(heldout=False), seq_len)
    if source in ("train", "mixed"):
        texts = [tokenizer.apply_chat_template(m, tokenize=False) for m in chats]
        pools["train"] = token_windows(tokenizer, texts, seq_len)
    rng = random.Random(seed)
    windows: list[list[int]] = []
    shares = [n - n // 2, n // 2] if len(pools) == 2 else [n]
    for (name, pool), share in zip(pools.items(), shares):
        if len(pool) < share:
            raise ConfigError(f"gptq.calib_samples={n}: the {name} text has only {len(pool)} windows of {seq_len} "
                              f"tokens for the {share} asked; lower gptq.calib_samples or gptq.calib_seq_len")
        windows += rng.sample(pool, share)
    return windows
