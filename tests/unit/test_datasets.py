"""Prompt sources of common/tasks.py: JSONL, Parquet, Hugging Face datasets (save_to_disk directories and hub
names read offline from a cache), column mappings, chat prompts, seeded per-epoch shuffling, resume by
position, the eval split reader, and the errors that name what is missing. Every file is written here."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import sys
from datetime import date
from decimal import Decimal
from pathlib import Path

import pytest

from common.tasks import (
    DatasetSpec,
    PromptRow,
    TaskError,
    addition_rows,
    check_prompt,
    dataset_rows,
    epoch_order,
    eval_rows,
    hf_rows,
    jsonl_rows,
    open_dataset,
    parquet_rows,
    parse_dataset_spec,
)
from common.wire import PromptTask, decode, encode

try:  # optional (extra "data"); the tests that need them skip without them
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError:
    pa = pq = None
try:
    import datasets
except ImportError:
    datasets = None
needs_pyarrow = pytest.mark.skipif(pa is None, reason="pyarrow (extra 'data') is not installed")
needs_datasets = pytest.mark.skipif(
    datasets is None or pa is None, reason="datasets (extra 'data') is not installed"
)

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3?"}]


def take(it, n):
    return list(itertools.islice(it, n))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def qa_rows(n: int) -> list[dict]:
    return [{"question": f"{i}+1=", "solution": str(i + 1), "level": i % 3} for i in range(n)]


# ---------------------------------------------------------------- specs
def test_spec_string_options_are_parsed():
    s = parse_dataset_spec(
        "hf:openai/gsm8k?config=main&split=train&columns=prompt:question,answer:solution&task=math_verify"
        "&shuffle=1&cache_dir=/tmp/c%20d"
    )
    assert s == DatasetSpec(
        "hf:openai/gsm8k", "train", "main", "math_verify", True, {"prompt": "question", "answer": "solution"},
        "/tmp/c d",
    )  # fmt: skip
    assert s.kind == "hf"
    assert parse_dataset_spec("addition").kind == "addition"
    assert parse_dataset_spec("a/b.jsonl").kind == "jsonl"
    assert parse_dataset_spec("a/b.parquet?shuffle=false") == DatasetSpec("a/b.parquet")
    assert parse_dataset_spec("a/b.parquet").kind == "parquet"


@pytest.mark.parametrize(
    ("spec", "msg"),
    [
        ("x.jsonl?sufle=1", "unknown option 'sufle=1'"),
        ("x.jsonl?shuffle=maybe", "shuffle='maybe'"),
        ("x.jsonl?split=train", "split/config apply to hf: sources only"),
        ("x.jsonl?columns=prompt", "not 'field:column'"),
        ("?split=train", "has no source"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec, msg):
    with pytest.raises(TaskError, match=msg.replace("(", r"\(").replace("?", r"\?")):
        parse_dataset_spec(spec)


def test_addition_spec_is_unchanged():
    assert take(dataset_rows("addition", seed=3), 20) == take(addition_rows(3), 20)
    assert take(dataset_rows("addition", seed=3, start=7), 5) == take(addition_rows(3), 12)[7:]


# ---------------------------------------------------------------- JSONL (today's format keeps working)
def test_jsonl_cycles_in_file_order_with_epoch_ids_and_resumes(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "answer": str(i)} for i in range(3)])
    rows = take(dataset_rows(str(data)), 7)
    assert [r.prompt for r in rows] == ["p0", "p1", "p2", "p0", "p1", "p2", "p0"]
    assert [r.prompt_id for r in rows[:4]] == ["d-1@0", "d-2@0", "d-3@0", "d-1@1"]
    assert rows[0] == PromptRow("d-1@0", "p0", "math_exact", {"answer": "0"})
    for start in range(7):
        assert take(dataset_rows(str(data), start=start), 7 - start) == rows[start:]


def test_jsonl_keeps_chat_prompts_and_maps_columns(tmp_path):
    data = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"messages": CHAT, "solution": "5", "id": "a", "source": "x"},
            {"messages": "plain text", "solution": "6", "task": "exact_match"},
        ],
    )
    rows = list(jsonl_rows(data, columns={"prompt": "messages", "answer": "solution"}))
    assert rows[0] == PromptRow("a", CHAT, "math_exact", {"answer": "5", "source": "x"})
    assert rows[1] == PromptRow("chat-2", "plain text", "exact_match", {"answer": "6"})
    spec = f"{data}?columns=prompt:messages,answer:solution&task=math_verify"
    assert take(dataset_rows(spec), 1)[0] == PromptRow(
        "a@0", CHAT, "math_verify", {"answer": "5", "source": "x"}
    )


def test_jsonl_errors_name_file_and_line(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "1+1=", "answer": "2"}, {"answer": "3"}])
    with pytest.raises(TaskError, match=rf"{bad}:2: each line needs a string 'prompt' field"):
        list(jsonl_rows(bad))
    bad = write_jsonl(tmp_path / "bad2.jsonl", [{"prompt": [{"role": "user"}]}])
    with pytest.raises(
        TaskError, match=r"bad2.jsonl:1: message 0 needs a string \(or list of parts\) 'content'"
    ):
        list(jsonl_rows(bad))
    bad = write_jsonl(tmp_path / "bad3.jsonl", [{"prompt": "x", "task": "no_such_reward"}])
    with pytest.raises(TaskError, match="unknown reward 'no_such_reward'"):
        list(jsonl_rows(bad))
    with pytest.raises(TaskError, match="does not exist"):
        list(dataset_rows(str(tmp_path / "missing.jsonl")))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(TaskError, match="is a directory without"):
        list(dataset_rows(str(tmp_path / "emptydir")))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(TaskError, match="has no rows"):
        next(dataset_rows(str(empty)))


def test_check_prompt_keeps_messages_and_drops_null_extras():
    assert check_prompt("hi") == "hi"
    msgs = [
        {"role": "user", "content": "hi", "name": None},
        {"role": "assistant", "content": "yo", "name": "b"},
    ]
    assert check_prompt(msgs) == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo", "name": "b"},
    ]
    for bad in ([], 3, [{"content": "x"}], ["x"], None):
        with pytest.raises(TaskError):
            check_prompt(bad)


# ---------------------------------------------------------------- Parquet
def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@needs_pyarrow
def test_parquet_file_and_directory_with_column_mapping(tmp_path):
    f = write_parquet(tmp_path / "train.parquet", qa_rows(4))
    rows = list(parquet_rows(f, columns={"prompt": "question", "answer": "solution"}))
    assert rows[2] == PromptRow("train-2", "2+1=", "math_exact", {"answer": "3", "level": 2})
    d = tmp_path / "shards"
    d.mkdir()
    write_parquet(d / "part-0.parquet", qa_rows(4)[:2])
    write_parquet(d / "part-1.parquet", qa_rows(4)[2:])
    spec = f"{d}?columns=prompt:question,answer:solution"
    assert parse_dataset_spec(spec).kind == "parquet"
    assert [r.prompt for r in open_dataset(spec)] == [r.prompt for r in rows]
    assert [r.prompt_id for r in take(dataset_rows(spec), 5)] == [
        "shards-0@0", "shards-1@0", "shards-2@0", "shards-3@0", "shards-0@1",
    ]  # fmt: skip


@needs_pyarrow
def test_parquet_chat_prompts_round_trip(tmp_path):
    rows = [
        {"prompt": CHAT, "answer": "5", "id": "c0"},
        {"prompt": [{"role": "user", "content": "hi", "name": "bob"}], "answer": "6", "id": "c1"},
    ]
    f = write_parquet(tmp_path / "chat.parquet", rows)
    got = list(parquet_rows(f))
    assert got[0].prompt == CHAT  # the struct's null 'name' is dropped, not rendered as None
    assert got[1].prompt == [{"role": "user", "content": "hi", "name": "bob"}]
    assert [r.prompt_id for r in got] == ["c0", "c1"]


@needs_pyarrow
def test_parquet_checks_columns_and_tasks_up_front(tmp_path):
    f = write_parquet(tmp_path / "t.parquet", qa_rows(3))
    with pytest.raises(TaskError, match=r"no column \['prompt'\].*map one with columns="):
        open_dataset(str(f))
    with pytest.raises(TaskError, match=r"no column \['answr'\]"):
        open_dataset(f"{f}?columns=prompt:question,answer:answr")
    g = write_parquet(tmp_path / "n.parquet", [{"prompt": "a"}, {"prompt": None}])
    with pytest.raises(TaskError, match="'prompt' .* has null values"):
        open_dataset(str(g))
    h = write_parquet(
        tmp_path / "k.parquet", [{"prompt": "a", "task": "exact_match"}, {"prompt": "b", "task": "nope"}]
    )
    with pytest.raises(TaskError, match="unknown reward 'nope'"):
        open_dataset(str(h))
    with pytest.raises(TaskError, match="does not exist"):
        open_dataset(str(tmp_path / "none.parquet"))


@needs_pyarrow
def test_meta_values_are_made_wire_safe(tmp_path):
    rows = [{"prompt": "p", "answer": Decimal("1.50"), "day": date(2024, 1, 2), "info": {"b": 1, "a": [1, 2]},
             "score": float("nan"), "tags": ["x", "y"]}]  # fmt: skip
    f = write_parquet(tmp_path / "m.parquet", rows)
    (row,) = parquet_rows(f)
    assert row.meta == {"answer": "1.50", "day": "2024-01-02", "info": '{"a": [1, 2], "b": 1}', "score": None,
                        "tags": ["x", "y"]}  # fmt: skip
    task = PromptTask(task_id="t", prompt="p", task=row.task, meta=row.meta)
    assert decode(encode(task), PromptTask).meta == row.meta


# ---------------------------------------------------------------- shuffling and resume
def test_shuffle_is_a_seeded_permutation_per_epoch_and_resumes_by_position(tmp_path):
    n = 10
    data = write_jsonl(tmp_path / "s.jsonl", [{"prompt": f"p{i}", "answer": str(i)} for i in range(n)])
    spec = f"{data}?shuffle=1"
    stream = take(dataset_rows(spec, seed=7), 3 * n)
    epochs = [stream[e * n : (e + 1) * n] for e in range(3)]
    for e, rows in enumerate(epochs):
        assert sorted(r.prompt for r in rows) == sorted(f"p{i}" for i in range(n))  # every row once per epoch
        assert [r.prompt for r in rows] == [
            f"p{i}" for i in epoch_order(n, 7, e, True)
        ]  # epoch e: seed 7 + e
        assert all(r.prompt_id.endswith(f"@{e}") for r in rows)
    assert [r.prompt for r in epochs[0]] != [r.prompt for r in epochs[1]]
    assert take(dataset_rows(spec, seed=7), 3 * n) == stream  # deterministic
    assert [r.prompt for r in take(dataset_rows(spec, seed=8), n)] == [
        r.prompt for r in epochs[1]
    ]  # 8 + 0 = 7 + 1
    for start in (0, 1, 9, 10, 11, 25):
        assert take(dataset_rows(spec, seed=7, start=start), 3 * n - start) == stream[start:]
    assert [r.prompt for r in take(dataset_rows(str(data), seed=7), n)] == [f"p{i}" for i in range(n)]


# ---------------------------------------------------------------- Hugging Face datasets
def save_dict(path: Path) -> Path:
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(qa_rows(5)),
            "test": datasets.Dataset.from_list([{"question": "9+9=", "solution": "18", "level": 0}]),
        }
    )
    dd.save_to_disk(str(path))
    return path


@needs_datasets
def test_hf_save_to_disk_splits_mapping_and_eval(tmp_path):
    d = save_dict(tmp_path / "qa")
    cols = "columns=prompt:question,answer:solution"
    rows = take(dataset_rows(f"hf:{d}?{cols}&shuffle=1", seed=1), 10)
    assert sorted(r.prompt for r in rows[:5]) == sorted(f"{i}+1=" for i in range(5))
    assert {r.prompt_id for r in rows[:5]} == {f"qa-train-{i}@0" for i in range(5)}
    assert rows[0].meta.keys() == {"answer", "level"}
    assert take(dataset_rows(f"hf:{d}?{cols}&shuffle=1", seed=1, start=6), 4) == rows[6:]
    (ev,) = eval_rows(f"hf:{d}?{cols}")  # eval reads split "test" by default
    assert ev == PromptRow("qa-test-0", "9+9=", "math_exact", {"answer": "18", "level": 0})
    assert [r.prompt for r in eval_rows(f"hf:{d}?{cols}&split=train", limit=2)] == ["0+1=", "1+1="]
    assert [r.prompt for r in hf_rows(str(d), "test", columns={"prompt": "question"})] == ["9+9="]
    with pytest.raises(TaskError, match=r"has no split 'validation'; splits: \['test', 'train'\]"):
        open_dataset(f"hf:{d}?{cols}&split=validation")


@needs_datasets
def test_hf_single_dataset_directory(tmp_path):
    path = tmp_path / "single"
    datasets.Dataset.from_list([{"prompt": CHAT, "answer": "5"}]).save_to_disk(str(path))
    (row,) = open_dataset(f"hf:{path}")
    assert row == PromptRow("single-0", CHAT, "math_exact", {"answer": "5"})


def build_hub_cache(tmp_path: Path, repo_id: str, splits: dict[str, list[dict]]) -> Path:
    """A datasets cache laid out as load_dataset(repo_id) leaves it after a download (built here offline)."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    files = {}
    for split, rows in splits.items():
        files[split] = str(write_parquet(tmp_path / f"{split}.parquet", rows))
    namespace, name = repo_id.split("/")
    staging = tmp_path / "staging"
    Parquet(
        cache_dir=str(staging), dataset_name=name, config_name="main", data_files=files, hash="0123abcd"
    ).download_and_prepare()
    (config_dir,) = (staging / name).iterdir()  # main-<hash of the data files>
    cache = tmp_path / "cache"
    (cache / f"{namespace}___{name}").mkdir(parents=True)
    shutil.move(str(config_dir), cache / f"{namespace}___{name}" / "main")
    return cache


@needs_datasets
def test_hf_hub_name_is_read_offline_from_the_cache(tmp_path, monkeypatch):
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):  # restored after the test, whatever the reader sets
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", datasets.config.HF_HUB_OFFLINE)
    cache = build_hub_cache(
        tmp_path,
        "tester/tiny_gsm",
        {"train": qa_rows(3), "test": [{"question": "q", "solution": "1", "level": 0}]},
    )
    spec = f"hf:tester/tiny_gsm?config=main&columns=prompt:question,answer:solution&cache_dir={cache}"
    rows = take(dataset_rows(spec), 4)
    assert [r.prompt_id for r in rows] == ["tiny_gsm-train-0@0", "tiny_gsm-train-1@0", "tiny_gsm-train-2@0",
                                           "tiny_gsm-train-0@1"]  # fmt: skip
    assert rows[1].meta == {"answer": "2", "level": 1}
    assert [r.prompt for r in eval_rows(spec)] == ["q"]
    assert os.environ["HF_DATASETS_OFFLINE"] == "1"
    with pytest.raises(TaskError, match=r"'tester/absent' .* is not in the datasets cache .* hub is offline"):
        open_dataset(f"hf:tester/absent?cache_dir={cache}")
    with pytest.raises(TaskError, match="config 'other'"):
        open_dataset(f"hf:tester/tiny_gsm?config=other&cache_dir={cache}")
    with pytest.raises(TaskError, match="Unknown split"):
        open_dataset(f"hf:tester/tiny_gsm?config=main&split=dev&cache_dir={cache}")


@needs_pyarrow
def test_missing_packages_name_the_extra(tmp_path, monkeypatch):
    f = write_parquet(tmp_path / "x.parquet", [{"prompt": "a"}])
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(TaskError, match=r"needs pyarrow: pip install 'gspo-pipeline\[data\]'"):
        open_dataset(str(f))
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(TaskError, match=r"need the datasets package: pip install 'gspo-pipeline\[data\]'"):
        open_dataset("hf:tester/anything")
