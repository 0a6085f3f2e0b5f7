"""Data shared by every stage: the built-in task, user datasets (chat, ShareGPT, alpaca or text rows, mixed by weight),
chat formatting and loss masks, calibration and held-out text."""
from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path

from .artifacts import content_hashes
from .config import ConfigError, DataConfig, DataSource, data_sources, heldout_of, source_keys

log = logging.getLogger(__name__)

BUILTIN = "builtin"
TEMPLATES = (
    "Write the number {n} in words.",
    "Spell out {n} in English words.",
    "How is {n} written in words?",
)
ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen").split()
TENS = "- - twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """American English words for 0 <= n < 10**6: 'four hundred three thousand twenty-one'."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + (f"-{ONES[n % 10]}" if n % 10 else "")
    if n < 1000:
        return f"{ONES[n // 100]} hundred" + (f" {number_words(n % 100)}" if n % 100 else "")
    return f"{number_words(n // 1000)} thousand" + (f" {number_words(n % 1000)}" if n % 1000 else "")


def builtin_task(n: int, seed: int) -> list[dict]:
    """Six-digit numbers in words. The base model never answers in exactly this form, and 30 LoRA steps teach
    most but not all of it (place value is the hard part), so the exact-match score has room to show what
    quantization loses, and the character similarity grades the near misses."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        number = rng.randrange(100_000, 1_000_000)
        rows.append({"instruction": rng.choice(TEMPLATES).format(n=f"{number:,}"), "input": "",
                     "output": number_words(number)})
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


STANDARD_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
                  "model": "assistant", "system": "system"}
LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
FORMAT_COLUMNS = {"chat": "'messages' or 'conversations'", "alpaca": "'instruction' and 'output'", "text": "'text'"}


def alpaca_messages(instruction: str, input_text: str | None, output: str) -> list[dict]:
    prompt = f"{instruction}\n\n{input_text}" if input_text else instruction
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def detect_format(columns: list[str], data: DataConfig, where: str) -> tuple[str, str]:
    """The row format (chat, alpaca or text) and the column holding the turns of a chat."""
    c = data.columns
    chat_column = c.messages or next((n for n in ("messages", "conversations") if n in columns), "messages")
    fits = {"chat": chat_column in columns, "alpaca": {c.instruction, c.output} <= set(columns),
            "text": c.text in columns}
    if data.format != "auto":
        if not fits[data.format]:
            raise ConfigError(f"{where}: data.format={data.format} needs {FORMAT_COLUMNS[data.format]} columns, found "
                              f"{columns} (name yours with data.columns.*)")
        return data.format, chat_column
    found = [name for name, ok in fits.items() if ok]
    if not found:
        raise ConfigError(f"{where}: unknown row shape, columns {columns}: expected 'messages' or 'conversations' "
                          "(chat), 'instruction'/'output' (alpaca) or 'text' (name yours with data.columns.*)")
    if len(found) > 1:
        raise ConfigError(f"{where}: ambiguous row shape, columns {columns} fit {' and '.join(found)}: set "
                          f"data.format to one of them")
    return found[0], chat_column


def row_normalizer(data: DataConfig, columns: list[str], where: str):
    """A function from a row of any supported shape to {"messages": [...], "text": "..."} (one of the two empty)."""
    fmt, chat_column = detect_format(columns, data, where)
    c = data.columns
    roles = {**STANDARD_ROLES, **{getattr(data.roles, role): role for role in ("user", "assistant", "system")
                                  if getattr(data.roles, role)}}
    system_column = c.system if c.system in columns and fmt != "text" else None

    def turn(row_number: int, t: dict) -> dict:
        role_key = c.role or ("role" if t.get("role") is not None else "from")
        content_key = c.content or ("content" if t.get("content") is not None else "value")
        name, content = t.get(role_key), t.get(content_key)
        if name not in roles:
            raise ConfigError(f"{where}: row {row_number}: role {name!r} is none of {', '.join(roles)} (map it with "
                              f"data.roles.user={name}, or .assistant, .system)")
        if not isinstance(content, str):
            raise ConfigError(f"{where}: row {row_number}: a {name!r} turn has no text in {content_key!r} "
                              "(name the key with data.columns.content)")
        return {"role": roles[name], "content": content}

    def normalize(row: dict, index: int) -> dict:
        number = index + 1
        if fmt == "text":
            if not isinstance(row[c.text], str) or not row[c.text].strip():
                raise ConfigError(f"{where}: row {number} has no {c.text!r} text")
            return {"messages": [], "text": row[c.text]}
        if fmt == "alpaca":
            if not isinstance(row[c.instruction], str) or not isinstance(row[c.output], str):
                raise ConfigError(f"{where}: row {number} has no {c.instruction!r}/{c.output!r} text")
            messages = alpaca_messages(row[c.instruction], row.get(c.input), row[c.output])
        else:
            if not isinstance(row[chat_column], list) or not row[chat_column]:
                raise ConfigError(f"{where}: row {number} has no turns in {chat_column!r}")
            messages = [turn(number, t) for t in row[chat_column]]
        if system_column and row[system_column] and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": row[system_column]})
        if not any(m["role"] == "assistant" for m in messages):
            raise ConfigError(f"{where}: row {number} has no assistant turn to train on")
        return {"messages": messages, "text": ""}

    return normalize


def row_features():
    from datasets import Features, Value

    return Features({"messages": [{"role": Value("string"), "content": Value("string")}], "text": Value("string")})


def load_source(data: DataConfig, path: str, split: str, where: str, seed: int, workdir: Path | None):
    """One source as a `datasets.Dataset` of normalized rows (chats or texts)."""
    import datasets

    if path == BUILTIN:
        path = str(write_jsonl(builtin_task(data.builtin_examples, seed), workdir / "builtin_task.jsonl"))
    loader = LOADERS.get(Path(path).suffix)
    ds = (datasets.load_dataset(loader, data_files=path, split="train") if loader else
          datasets.load_dataset(path, split=split))
    if len(ds) == 0:
        raise ConfigError(f"{where}: no rows")
    return ds.map(row_normalizer(data, ds.column_names, where), with_indices=True, remove_columns=ds.column_names,
                  features=row_features(), desc="reading rows")


def split_rows(ds, heldout: int, seed: int, where: str):
    if heldout == 0:
        return ds, ds.select([])
    if heldout >= len(ds):
        raise ConfigError(f"{where}: {len(ds)} rows, too few to hold out {heldout} (data.heldout_examples)")
    parts = ds.train_test_split(test_size=heldout, seed=seed)
    return parts["train"], parts["test"]


def load_sources(data: DataConfig, seed: int, workdir: Path | None) -> list[tuple[DataSource, object, object]]:
    """(source, training rows, held-out rows) for every source: held out of it, or read from its heldout_path."""
    loaded = []
    for i, source in enumerate(data_sources(data)):
        path_key, heldout_key = source_keys(data, i)
        where = f"{path_key}={source.path!r}"
        rows = load_source(data, source.path, source.split, where, seed, workdir)
        heldout = heldout_of(data, source)
        if isinstance(heldout, str):  # an HF dataset id gives its test split
            loaded.append((source, rows, load_source(data, heldout, "test", f"{heldout_key}={heldout!r}", seed,
                                                     workdir)))
        else:
            loaded.append((source, *split_rows(rows, heldout, seed, where)))
    return loaded


def mix(parts: list, weights: list[float], seed: int):
    """Rows drawn from each part with probability proportional to its weight, until every part has given all of its
    rows at least once (so no row is left out: smaller parts repeat)."""
    import datasets

    if len(parts) == 1:
        return parts[0]
    return datasets.interleave_datasets(parts, probabilities=[w / sum(weights) for w in weights], seed=seed,
                                        stopping_strategy="all_exhausted")


def compact(row: dict) -> dict:
    """A normalized row as written to train.jsonl/heldout.jsonl: {"messages": [...]} or {"text": "..."}."""
    return {"messages": row["messages"]} if row.get("messages") else {"text": row["text"]}


def task_chats(rows: list[dict]) -> list[list[dict]]:
    """The chats whose last turn is an answer to score: prompt = every turn before it."""
    return [row["messages"] for row in rows if row.get("messages") and row["messages"][-1]["role"] == "assistant"]


def row_text(tokenizer, row: dict) -> str:
    """A row as the model reads it: a chat rendered with the chat template, or the text itself."""
    return tokenizer.apply_chat_template(row["messages"], tokenize=False) if row.get("messages") else row["text"]


def local_data_files(data: DataConfig) -> list[tuple[str, str, str]]:
    """(config key, path, split) of every local file among the sources and their held-out files."""
    found = []
    for i, source in enumerate(data_sources(data)):
        for key, path in zip(source_keys(data, i), (source.path, source.heldout_path)):
            if path and Path(path).suffix in LOADERS:
                found.append((key, path, source.split))
    return found


def data_identity(data: DataConfig) -> dict:
    """What identifies the data files, for the train stage's fingerprint: a hash of every local file's content."""
    return content_hashes(path for _, path, _ in local_data_files(data))


# The chat template for tokenizers that have none (base models, GPT-NeoX-style tokenizers): Zephyr's plain-text
# role markers, every turn ended by the tokenizer's EOS token, so that the fine-tuned model learns to stop on the
# token that transformers and vLLM stop generation on. It is saved with every checkpoint the pipeline writes.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    """The prompt a model sees before it answers the last message (the generation prompt included)."""
    return tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)


def tokenize_chat(tokenizer, messages: list[dict], last_turn_only: bool = False) -> dict:
    """input_ids for the whole chat; labels on the assistant turns (each answer and the end-of-turn tokens after
    it), every other token (system, user, the template's markup) masked with -100. Each piece is tokenized on its
    own, so that a prompt's tokens are the ones the model sees when it answers at inference."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    input_ids, labels, done = [], [], 0  # done: the characters of `full` tokenized so far
    for i in answers[-1:] if last_turn_only else answers:
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False)
        through = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
        if not (full.startswith(prompt) and full.startswith(through) and done <= len(prompt)):
            raise ConfigError("the tokenizer's chat template does not render a chat's first turns as a prefix of the "
                              "whole chat, so its answers cannot be told apart (try data.train_on=last_turn)")
        context = tokenizer(full[done:len(prompt)], add_special_tokens=False)["input_ids"]
        answer = tokenizer(full[len(prompt):len(through)], add_special_tokens=False)["input_ids"]
        input_ids += context + answer
        labels += [-100] * len(context) + answer
        done = len(through)
    rest = tokenizer(full[done:], add_special_tokens=False)["input_ids"] if done < len(full) else []
    return {"input_ids": input_ids + rest, "labels": labels + [-100] * len(rest)}


def tokenize_text(tokenizer, text: str, max_seq_len: int) -> list[dict]:
    """A text row for continued pretraining: loss on every token, cut into pieces of at most max_seq_len tokens."""
    ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    pieces = [ids[i:i + max_seq_len] for i in range(0, len(ids), max_seq_len)]
    return [{"input_ids": p, "labels": list(p)} for p in pieces if len(p) > 1]  # one token predicts nothing


def tokenize_rows(tokenizer, batch: dict, last_turn_only: bool, max_seq_len: int) -> dict:
    """A `datasets.map(batched=True)` function from normalized rows to training examples."""
    examples = []
    for messages, text in zip(batch["messages"], batch["text"]):
        examples += ([tokenize_chat(tokenizer, messages, last_turn_only)] if messages else
                     tokenize_text(tokenizer, text, max_seq_len))
    return {"input_ids": [e["input_ids"] for e in examples], "labels": [e["labels"] for e in examples]}


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


def calibration_windows(tokenizer, source: str, rows: list[dict], n: int, seq_len: int,
                        seed: int) -> list[list[int]]:
    """n windows of seq_len tokens from pydoc text, the training rows, or half of each ('mixed')."""
    pools = {}
    if source in ("pydoc", "mixed"):
        pools["pydoc"] = token_windows(tokenizer, pydoc_texts(heldout=False), seq_len)
    if source in ("train", "mixed"):
        texts = [row_text(tokenizer, row) for row in rows]
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
