"""data: the row shapes users bring (ShareGPT, chats with system turns, alpaca, text; JSONL/JSON/Parquet/CSV), column
and role mapping, loss masks on a multi-turn chat token by token, weighted mixing, packing, trackers; and each
shape trained and evaluated end to end."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest

from pipeline.artifacts import read_manifest
from pipeline.config import ConfigError
from pipeline.data import (TEMPLATES, builtin_task, load_sources, mix, number_words, pydoc_texts, tokenize_chat,
                           tokenize_text)
from pipeline.models import load_tokenizer
from pipeline.runner import run

from .conftest import TINY, compose_config

TASK = builtin_task(60, seed=5)
SYSTEM = "You write numbers in words."
CHAT = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TASK[0]["instruction"]},
        {"role": "assistant", "content": TASK[0]["output"]}, {"role": "user", "content": TASK[1]["instruction"]},
        {"role": "assistant", "content": TASK[1]["output"]}]
SHAREGPT_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}


def sharegpt(chat: list[dict]) -> dict:
    return {"conversations": [{"from": SHAREGPT_ROLES[m["role"]], "value": m["content"]} for m in chat]}


def chats(n: int) -> list[list[dict]]:
    """Multi-turn chats with a system prompt: two questions of the built-in task each."""
    return [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": a["instruction"]},
             {"role": "assistant", "content": a["output"]}, {"role": "user", "content": b["instruction"]},
             {"role": "assistant", "content": b["output"]}] for a, b in zip(TASK[:n], TASK[n:2 * n])]


def write(path: Path, rows: list[dict]) -> str:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    else:
        pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


@pytest.mark.parametrize("number, words", [
    (0, "zero"), (15, "fifteen"), (40, "forty"), (99, "ninety-nine"), (100, "one hundred"), (305, "three hundred five"),
    (1000, "one thousand"), (100_010, "one hundred thousand ten"), (403_021, "four hundred three thousand twenty-one"),
    (999_999, "nine hundred ninety-nine thousand nine hundred ninety-nine")])
def test_number_words(number, words):
    assert number_words(number) == words


def test_builtin_task_asks_for_six_digit_numbers_in_words():
    rows = builtin_task(200, seed=3)
    assert rows == builtin_task(200, seed=3) and rows != builtin_task(200, seed=4)
    for row in rows:
        number = int(re.search(r"[\d,]{7}", row["instruction"]).group().replace(",", ""))
        assert 100_000 <= number < 1_000_000 and row["output"] == number_words(number)
    assert {re.sub(r"[\d,]{7}", "{n}", row["instruction"]) for row in rows} == set(TEMPLATES)


ALPACA_FIRST = [{"role": "user", "content": TASK[0]["instruction"]},
                {"role": "assistant", "content": TASK[0]["output"]}]
# file name -> (rows written, a row as the pipeline reads it)
SHAPES = {
    "sharegpt.jsonl": ([sharegpt(c) for c in chats(30)], {"messages": chats(30)[0]}),
    "chat.jsonl": ([{"messages": c} for c in chats(30)], {"messages": chats(30)[0]}),
    "alpaca.json": (TASK, {"messages": ALPACA_FIRST}),
    "alpaca.parquet": (TASK, {"messages": ALPACA_FIRST}),
    "alpaca.csv": ([{**r, "system": SYSTEM} for r in TASK],  # a system column becomes the system turn
                   {"messages": [{"role": "system", "content": SYSTEM}, *ALPACA_FIRST]}),
    "text.jsonl": ([{"text": t} for t in pydoc_texts(heldout=False)[:40]], {"text": pydoc_texts(heldout=False)[0]}),
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    for name, (rows, _) in SHAPES.items():
        write(folder / name, rows)
    return folder


def read(data_dir: Path, *overrides: str):
    """(training rows, held-out rows) of the only source, as the train stage reads them."""
    (_, train, heldout), = load_sources(compose_config(*overrides).data, 0, None)
    return train, heldout


@pytest.mark.parametrize("name", list(SHAPES))
def test_each_shape_is_read_without_conversion(data_dir, name):
    rows, first = SHAPES[name]
    train, heldout = read(data_dir, f"data.source={data_dir / name}", "data.heldout_examples=5")
    assert len(train) + len(heldout) == len(rows) and len(heldout) == 5
    every = list(train) + list(heldout)
    assert {"messages": [], "text": "", **first} in every
    assert all(bool(r["messages"]) != bool(r["text"]) for r in every)


def test_a_dataset_folder_is_read_like_a_hub_dataset(data_dir):
    """A name that is no file goes to datasets.load_dataset as an HF dataset id; a local dataset repo works offline."""
    repo = data_dir / "hub-dataset"
    (repo / "data").mkdir(parents=True)
    write(repo / "data" / "train-00000-of-00001.parquet", [sharegpt(c) for c in chats(20)])
    train, heldout = read(data_dir, f"data.source={repo}", "data.split=train", "data.heldout_examples=2")
    assert len(train) == 18 and {"messages": chats(20)[0], "text": ""} in [*train, *heldout]


def test_columns_and_roles_of_another_shape_are_mapped(data_dir):
    rows = [{"dialog": [{"speaker": "customer", "utterance": r["instruction"]},
                        {"speaker": "agent", "utterance": r["output"]}], "persona": SYSTEM} for r in TASK]
    path = write(data_dir / "custom.jsonl", rows)
    mapping = ["data.columns.messages=dialog", "data.columns.role=speaker", "data.columns.content=utterance",
               "data.columns.system=persona", "data.roles.user=customer", "data.roles.assistant=agent"]
    train, _ = read(data_dir, f"data.source={path}", "data.heldout_examples=0", *mapping)
    assert train[0]["messages"] == [{"role": "system", "content": SYSTEM},
                                    {"role": "user", "content": TASK[0]["instruction"]},
                                    {"role": "assistant", "content": TASK[0]["output"]}]
    with pytest.raises(ConfigError, match=r"row 1: role 'customer' is none of .* data.roles.user=customer"):
        read(data_dir, f"data.source={path}", *mapping[:4])


BAD_SHAPES = [
    ([{"question": "q", "answer": "a"}], [], "unknown row shape, columns ['question', 'answer']"),
    ([{"text": "t", "messages": CHAT}], [], "ambiguous row shape, columns ['text', 'messages'] fit chat and text"),
    ([{"text": "t", "messages": CHAT}], ["data.format=alpaca"], "data.format=alpaca needs 'instruction' and 'output'"),
    ([{"messages": CHAT[:2]}], [], "row 1 has no assistant turn to train on"),
    ([{"instruction": "i", "output": "o"}, {"instruction": "i"}], [], "row 2 has no 'instruction'/'output' text"),
    ([{"conversations": [{"from": "narrator", "value": "v"}]}], [], "row 1: role 'narrator' is none of"),
    ([{"text": ""}], [], "row 1 has no 'text' text"),
]


@pytest.mark.parametrize("rows, overrides, message", BAD_SHAPES, ids=[b[2][:30] for b in BAD_SHAPES])
def test_a_bad_shape_is_one_line_naming_the_columns(tmp_path, rows, overrides, message):
    path = write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ConfigError, match=None) as error:
        read(tmp_path, f"data.source={path}", "data.heldout_examples=0", *overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


def runs(tokenizer, example: dict) -> list[tuple[bool, str]]:
    """The example as alternating runs of (trained on?, the text of its tokens), decoded token by token."""
    out: list[tuple[bool, str]] = []
    for token, label in zip(example["input_ids"], example["labels"]):
        trained = label != -100
        assert label in (-100, token)
        text = tokenizer.decode([token])
        out[-1:] = [(trained, out[-1][1] + text)] if out and out[-1][0] == trained else [*out[-1:], (trained, text)]
    return out


def test_every_assistant_turn_is_trained_and_nothing_else(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)  # ChatML, as SmolLM2 and Qwen2
    q1, a1, q2, a2 = (m["content"] for m in CHAT[1:])
    assert runs(tokenizer, tokenize_chat(tokenizer, CHAT)) == [
        (False, f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{q1}<|im_end|>\n<|im_start|>assistant\n"),
        (True, f"{a1}<|im_end|>\n"),
        (False, f"<|im_start|>user\n{q2}<|im_end|>\n<|im_start|>assistant\n"),
        (True, f"{a2}<|im_end|>\n")]
    last = runs(tokenizer, tokenize_chat(tokenizer, CHAT, last_turn_only=True))
    assert [trained for trained, _ in last] == [False, True] and last[1][1] == f"{a2}<|im_end|>\n"
    # A chat that ends on a user turn trains on its answers and masks the rest.
    assert runs(tokenizer, tokenize_chat(tokenizer, CHAT[:4]))[-1] == (False, f"<|im_start|>user\n{q2}<|im_end|>\n")


def test_a_text_row_trains_on_every_token_in_pieces(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    text = pydoc_texts(heldout=False)[0]
    pieces = tokenize_text(tokenizer, text, max_seq_len=64)
    ids = [i for p in pieces for i in p["input_ids"]]
    assert all(p["labels"] == p["input_ids"] and len(p["input_ids"]) <= 64 for p in pieces)
    assert ids[-1] == tokenizer.eos_token_id and tokenizer.decode(ids[:-1]) == text


def test_sources_mix_by_weight_and_each_holds_out_its_own(tmp_path, tiny_model_dir):
    from pipeline.stages.train import build_dataset

    a = write(tmp_path / "a.jsonl", [{"instruction": f"alpha {i}", "output": "a"} for i in range(200)])
    b = write(tmp_path / "b.jsonl", [{"instruction": f"beta {i}", "output": "b"} for i in range(40)])
    b_heldout = write(tmp_path / "b-heldout.jsonl", [{"instruction": f"held {i}", "output": "b"} for i in range(7)])
    sources = f"[{{path: {a}, weight: 0.25}}, {{path: {b}, weight: 0.75, heldout_path: {b_heldout}}}]"
    cfg = compose_config("data.heldout_examples=10", f"data.sources={sources}")
    (_, train_a, heldout_a), (_, train_b, heldout_b) = load_sources(cfg.data, 0, None)
    assert (len(train_a), len(heldout_a), len(train_b), len(heldout_b)) == (190, 10, 40, 7)
    mixed = [r["messages"][0]["content"] for r in mix([train_a, train_b], [0.25, 0.75], seed=0)]
    share_a = sum(p.startswith("alpha") for p in mixed) / len(mixed)
    assert abs(share_a - 0.25) < 0.03, share_a
    assert set(mixed) == {r["messages"][0]["content"] for r in [*train_a, *train_b]}  # no row left out

    examples, heldout, stats = build_dataset(cfg, load_tokenizer(tiny_model_dir), tmp_path / "work")
    assert stats["train_rows"] == len(mixed) == len(examples) and len(heldout) == stats["heldout_rows"] == 17
    assert [s["heldout_rows"] for s in stats["sources"]] == [10, 7]
    assert len((tmp_path / "work" / "data" / "train.jsonl").read_text().splitlines()) == 230


def first_losses(cfg, base: Path, collator=None) -> list[float]:
    from pipeline.stages import train

    tokenizer = load_tokenizer(base)
    dataset, _, _ = train.build_dataset(cfg, tokenizer, Path(cfg.output_dir))
    trainer = train.build_trainer(cfg, train.build_model(cfg, base), tokenizer, dataset, Path(cfg.output_dir) / "ck")
    trainer.data_collator = collator or trainer.data_collator
    trainer.args.save_strategy = "no"
    trainer.train()
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def test_packing_gives_the_losses_of_padded_batches(finished, data_dir, tmp_path):
    from transformers import DataCollatorWithFlattening

    out, overrides, _ = finished
    base = out / "default" / "base" / "nf4"
    settings = [*overrides, f"data.source={data_dir / 'chat.jsonl'}", "data.heldout_examples=0", "train.max_steps=4",
                "train.logging_steps=1"]
    padded = first_losses(compose_config(*settings, f"output_dir={tmp_path / 'a'}"), base)
    packed = first_losses(compose_config(*settings, f"output_dir={tmp_path / 'b'}", "data.packing=true"), base)
    # The control: packed without position ids, so that attention crosses the examples' boundaries.
    leaking = first_losses(compose_config(*settings, f"output_dir={tmp_path / 'c'}", "data.packing=true"), base,
                           DataCollatorWithFlattening(return_position_ids=False))
    assert len(padded) == len(packed) == 4
    assert abs(packed[0] - padded[0]) / padded[0] < 1e-5  # the same weights: the same loss
    assert all(abs(p - q) / q < 2e-3 for p, q in zip(packed, padded))  # then bf16 steps drift a little
    assert abs(leaking[0] - padded[0]) / padded[0] > 1e-4


# Trained and evaluated end to end: (data overrides, task accuracy measured?)
END_TO_END = {
    "sharegpt": (["data.source={d}/sharegpt.jsonl"], True),
    "multi-turn with system": (["data.source={d}/chat.jsonl", "data.train_on=all_turns"], True),
    "text": (["data.source={d}/text.jsonl"], False),
    "two-source mix": (["data.sources=[{{path: {d}/chat.jsonl, weight: 0.7}}, {{path: {d}/text.jsonl, weight: 0.3}}]",
                        "train.eval_steps=4", "train.report_to=[tensorboard,wandb,mlflow]"], True),
}


@pytest.fixture(scope="module")
def shared_outputs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("shapes") / "outputs"  # one base for every shape


@pytest.mark.parametrize("name", list(END_TO_END))
def test_each_shape_trains_and_evaluates(tiny_model_dir, data_dir, shared_outputs, name):
    data, has_task = END_TO_END[name]
    cfg = compose_config(f"model.name_or_path={tiny_model_dir}", *TINY, f"output_dir={shared_outputs}",
                         f"sweep_point={name.replace(' ', '-')}", "data.heldout_examples=4", "stage=eval",
                         "eval.artifacts=[qlora,gptq]", *[o.format(d=data_dir) for o in data])
    run(cfg)
    exp = shared_outputs / cfg.experiment / cfg.sweep_point
    evaluation = json.loads((exp / "eval" / "eval.json").read_text())
    for artifact in ("qlora", "gptq"):
        assert math.isfinite(evaluation["artifacts"][artifact]["ppl"])
        assert (evaluation["artifacts"][artifact]["task_accuracy"] is not None) == has_task
    train = read_manifest(exp / "train")["metrics"]
    assert train["heldout_rows"] == 4 * len(train["sources"]) and train["dropped_rows"] == 0
    if name == "two-source mix":
        check_tracking(exp, read_manifest(exp / "train"))


def check_tracking(exp: Path, manifest: dict) -> None:
    """Held-out loss in loss.json and in every tracker, with the pipeline config and the stage fingerprints."""
    import mlflow
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fingerprint = manifest["fingerprint"]
    losses = json.loads((exp / "train" / "loss.json").read_text())
    assert [e["step"] for e in losses if "eval_loss" in e] == [4, 8, 12]
    assert manifest["metrics"]["final_heldout_loss"] == losses[-1]["eval_loss"]

    events = EventAccumulator(str(exp / "tracking" / "tensorboard" / f"train-{fingerprint}"),
                              size_guidance={"tensors": 0}).Reload()
    assert {"train/loss", "eval/loss"} <= set(events.Tags()["scalars"])
    pipeline_text = events.Tensors("pipeline/text_summary")[0].tensor_proto.string_val[0].decode()
    assert f"train: {fingerprint}" in pipeline_text and "train_on: all_turns" in pipeline_text

    run_file, = (exp / "tracking" / "wandb").glob("offline-run-*/run-*.wandb")
    assert fingerprint.encode() in run_file.read_bytes()

    client = mlflow.MlflowClient((exp / "tracking" / "mlruns").as_uri())
    mlflow_run, = client.search_runs([client.get_experiment_by_name("default").experiment_id])
    assert mlflow_run.data.tags["fingerprint.train"] == fingerprint
    assert [m.step for m in client.get_metric_history(mlflow_run.info.run_id, "eval_loss")] == [4, 8, 12]
    assert "pipeline.json" in [a.path for a in client.list_artifacts(mlflow_run.info.run_id)]
