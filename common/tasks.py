"""Verifiable tasks: reward functions (a registry addressable by name or ``module:function``) and
prompt sources (the built-in reference task, JSONL and Parquet files, Hugging Face ``datasets``).

A reward function has the signature ``reward(completion: str, meta: dict) -> float`` where ``meta``
holds the fields of the dataset row that the reward needs (e.g. ``answer``).

A dataset is named by a *spec* string (``learner.dataset``)::

    addition                                   the built-in reference task (endless, seeded)
    data/train.jsonl                           a JSONL file (any path that is not Parquet)
    data/train.parquet | data/parquet_dir/     a Parquet file, or every *.parquet under a directory
    hf:openai/gsm8k                            a hub dataset, read offline from the datasets cache
    hf:/data/my_dataset                        a directory saved with save_to_disk (or of data files)

followed by optional ``?key=value&...`` options: ``split`` and ``config`` (hf: only), ``task`` (the reward
of rows without a task column; default ``math_exact``), ``shuffle`` (1/0: a new seeded order every epoch),
``columns`` (``prompt:question,answer:solution``: a row field or meta key ← the dataset's column) and
``cache_dir`` (the datasets cache of hf: names). Example:
``hf:openai/gsm8k?config=main&split=train&columns=prompt:question&task=math_verify&shuffle=1``.

Rows are cycled without end; a position ``p`` is row ``p mod n`` of epoch ``p // n`` (of that epoch's
shuffled order when shuffling: seed ``seed + epoch``), so ``dataset_rows(spec, seed, start=cursor)`` resumes
exactly. ``eval_rows`` reads a split once, in order.

A row's ``prompt`` is a string or a list of chat messages ``[{"role": ..., "content": ...}]`` (TRL's
conversational format); it is kept as is here and rendered torch-side (``modeling.chat.render_prompt``).

Parquet needs ``pyarrow`` and ``hf:`` needs ``datasets`` (extra ``data``); ``math_verify`` needs
``math-verify`` (extra ``math``). All are imported lazily: this module never imports torch.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import random
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any, NotRequired, TypedDict
from urllib.parse import unquote

RewardFn = Callable[[str, dict[str, Any]], float]
_REGISTRY: dict[str, RewardFn] = {}


class TaskError(ValueError):
    """Unknown reward, or a dataset row that does not fit its task, or a dataset that cannot be read."""


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    def deco(fn: RewardFn) -> RewardFn:
        _REGISTRY[name] = fn
        return fn

    return deco


def get_reward(name: str) -> RewardFn:
    """Resolve a reward by registry name or ``package.module:function``."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise TaskError(f"reward {name!r} cannot be imported: {e}") from None
        if not callable(fn):
            raise TaskError(f"reward {name!r} is not callable")
        _REGISTRY[name] = fn
        return fn
    raise TaskError(f"unknown reward {name!r}; known: {sorted(_REGISTRY)} or 'module:function'")


# --------------------------------------------------------------------------- rewards
_NUM = r"\d+(?:\.\d+)?"
# the numbers math_exact compares: \frac{a}{b} (also \dfrac, \tfrac, \frac12), a/b, a decimal; optional sign
_VALUE_RE = re.compile(
    rf"(?P<sign>-\s*)?(?:\\[dt]?frac\s*(?:\{{\s*(?P<fn>-?{_NUM})\s*\}}|(?P<fn1>\d))\s*(?:\{{\s*(?P<fd>{_NUM})\s*\}}|(?P<fd1>\d))"
    rf"|(?P<rn>{_NUM})\s*/\s*(?P<rd>{_NUM})(?![\d.])"
    rf"|(?P<num>{_NUM}))"
)


def _last_value(text: str) -> Fraction | None:
    """The last number in ``text`` as an exact rational ("007" -> 7, "2.50" -> 5/2, "\\frac{1}{2}" -> 1/2)."""
    found = list(_VALUE_RE.finditer(text.replace("{,}", "").replace(",", "")))
    if not found:
        return None
    m = found[-1]
    if m["num"] is not None:
        value = Fraction(Decimal(m["num"]))
    else:
        num = m["fn"] or m["fn1"] or m["rn"]
        den = m["fd"] or m["fd1"] or m["rd"]
        if Decimal(den) == 0:
            return None
        value = Fraction(Decimal(num)) / Fraction(Decimal(den))
    return -value if m["sign"] is not None else value


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) with balanced braces, e.g. ``\\frac{1}{2}``;
    None if there is none or it is not closed."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def final_answer(completion: str) -> str:
    """The part of a completion that holds its final answer: the last balanced ``\\boxed{}``, else what
    follows the last ``####``, else the whole text."""
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed
    if "####" in completion:
        return completion.rsplit("####", 1)[1]
    return completion


@register_reward("math_exact")
def math_exact(completion: str, meta: dict[str, Any]) -> float:
    """1.0 if the final number of the completion's answer (its last ``\\boxed{}``, balanced braces, else after
    ``####``, else the whole text) equals the final number of ``meta['answer']`` as an exact rational:
    ``\\frac{1}{2}``, ``1/2`` and ``0.5`` are equal; thousands separators (``,``, ``{,}``) are ignored."""
    if "answer" not in meta:
        raise TaskError("math_exact needs an 'answer' field")
    got = _last_value(final_answer(completion))
    want = _last_value(final_answer(str(meta["answer"])))
    return 1.0 if got is not None and got == want else 0.0


_math_verify_mod: Any = None


class _NoTimeoutWarning(logging.Filter):
    """math_verify warns on every call made off the main thread that it has no timeout of its own; the producer
    runs rewards on worker threads with its own per-call timeout (producer.reward_timeout_s), so the warning
    only floods the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Timeout is disabled")


def _math_verify() -> Any:
    global _math_verify_mod
    if _math_verify_mod is None:
        try:
            _math_verify_mod = importlib.import_module("math_verify")
        except ImportError:
            raise TaskError(
                "the math_verify reward needs the math-verify package: pip install 'gspo-pipeline[math]'"
            ) from None
        for name in ("math_verify.parser", "math_verify.grader"):
            logging.getLogger(name).addFilter(_NoTimeoutWarning())
    return _math_verify_mod


@register_reward("math_verify")
def math_verify_reward(completion: str, meta: dict[str, Any]) -> float:
    """1.0 if HF ``math_verify`` finds the completion's answer mathematically equal to ``meta['answer']``.

    The answer may be plain (``72``, ``\\frac{1}{2}``, ``x^2+1``), in ``$...$``, a solution with a
    ``\\boxed{}``, or a GSM8K solution ending in ``#### 72`` (the part after ``####`` is taken). An answer
    that math_verify cannot parse raises TaskError (a dataset problem, not a wrong completion). Parsing and
    verification time out after 5 s in the main thread (SIGALRM); elsewhere (the producer's reward threads) the
    caller's timeout applies (producer.reward_timeout_s)."""
    if "answer" not in meta:
        raise TaskError("math_verify needs an 'answer' field")
    mv = _math_verify()
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    answer = str(meta["answer"]).strip()
    if "####" in answer and last_boxed(answer) is None:
        answer = answer.rsplit("####", 1)[1].strip()
    if last_boxed(answer) is not None or "$" in answer:  # a solution text, or LaTeX already delimited
        gold = mv.parse(answer, parsing_timeout=timeout)
    else:  # a bare answer is one expression: "x^2 + 1" is x**2 + 1, not its last number
        gold = mv.parse(f"${answer}$", parsing_timeout=timeout) or mv.parse(answer, parsing_timeout=timeout)
    if not any(not isinstance(g, str) for g in gold):  # nothing, or only the unparsed string
        raise TaskError(f"math_verify cannot parse the answer {answer[:200]!r}")
    pred = mv.parse(completion, parsing_timeout=timeout)
    if not pred:
        return 0.0
    return 1.0 if mv.verify(gold, pred, timeout_seconds=timeout) else 0.0


@register_reward("exact_match")
def exact_match(completion: str, meta: dict[str, Any]) -> float:
    """1.0 if the stripped completion equals ``meta['answer']`` exactly."""
    if "answer" not in meta:
        raise TaskError("exact_match needs an 'answer' field")
    return 1.0 if completion.strip() == str(meta["answer"]).strip() else 0.0


# --------------------------------------------------------------------------- reference task
ADDITION_CHARS = "0123456789+="


@register_reward("addition")
def addition_reward(completion: str, meta: dict[str, Any]) -> float:
    """Reference task: 1.0 iff the completion (up to EOS, no spaces) is exactly the sum."""
    if "answer" not in meta:
        raise TaskError("addition needs an 'answer' field")
    return 1.0 if completion.strip() == str(meta["answer"]) else 0.0


class ChatMessage(TypedDict):
    """One message of a conversational prompt; keys other than role/content (``name``, ...) are kept."""

    role: str
    content: str | list[Any]
    name: NotRequired[str]


Prompt = str | list[ChatMessage]


@dataclass(frozen=True)
class PromptRow:
    prompt_id: str
    prompt: Prompt  # text, or chat messages rendered torch-side (modeling.chat.render_prompt)
    task: str
    meta: dict[str, Any]


def is_chat(prompt: Prompt) -> bool:
    return isinstance(prompt, list)


def check_prompt(value: Any, where: str = "prompt") -> Prompt:
    """A string, or a non-empty list of ``{"role": str, "content": str | list, ...}`` messages (extra keys
    with a None value, as Arrow struct columns give them, are dropped); anything else is a TaskError."""
    if isinstance(value, str):
        return value
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list) or not value:
        raise TaskError(
            f"{where}: a prompt is a string or a non-empty list of chat messages, got {type(value).__name__}"
        )
    messages: list[ChatMessage] = []
    for k, m in enumerate(value):
        if not isinstance(m, Mapping):
            raise TaskError(f"{where}: message {k} is a {type(m).__name__}, not a {{'role', 'content'}} map")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            raise TaskError(f"{where}: message {k} needs a string 'role'")
        if not isinstance(content, (str, list)):
            raise TaskError(f"{where}: message {k} needs a string (or list of parts) 'content'")
        messages.append({str(key): v for key, v in m.items() if v is not None})  # type: ignore[misc]
    return messages


def _wire_safe(value: Any) -> Any:
    """A meta value the wire format carries (None, bool, int, finite float, str, lists of these): dicts become
    JSON text, NaN/inf None, anything else (Decimal, dates, numpy scalars) its ``str``."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [_wire_safe(v) for v in value]
    if isinstance(value, Mapping):
        return json.dumps(value, sort_keys=True, default=str, ensure_ascii=False)
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        try:
            return _wire_safe(value.item())
        except (TypeError, ValueError):
            pass
    return str(value)


_SPECIAL = ("prompt", "task", "id")


def _make_row(
    obj: dict[str, Any], columns: Mapping[str, str], default_task: str, default_id: str, where: str
) -> PromptRow:
    """A PromptRow from one record: ``columns`` maps a field (prompt, task, id) or meta key to the record's
    column; unmapped fields are read from their own column; every column not consumed goes to meta."""
    src = {name: columns.get(name, name) for name in _SPECIAL}
    if src["prompt"] not in obj or obj[src["prompt"]] is None:
        raise TaskError(f"{where}: no {src['prompt']!r} column (the prompt); columns: {sorted(obj)}")
    prompt = check_prompt(obj[src["prompt"]], where)
    task = obj.get(src["task"])
    task = default_task if task is None else str(task)
    get_reward(task)
    pid = obj.get(src["id"])
    pid = default_id if pid is None else str(pid)
    consumed = set(src.values()) | set(columns.values())
    meta = {k: _wire_safe(v) for k, v in obj.items() if k not in consumed}
    for target, column in columns.items():
        if target in _SPECIAL:
            continue
        if column not in obj:
            raise TaskError(f"{where}: no column {column!r} (mapped to {target!r}); columns: {sorted(obj)}")
        meta[target] = _wire_safe(obj[column])
    return PromptRow(pid, prompt, task, meta)


def addition_prompt(a: int, b: int) -> PromptRow:
    """``"AA+BB="`` with zero-padded operands; the answer is the plain decimal sum."""
    return PromptRow(f"add-{a:02d}-{b:02d}", f"{a:02d}+{b:02d}=", "addition", {"answer": str(a + b)})


def addition_rows(seed: int, start: int = 0) -> Iterator[PromptRow]:
    """An endless, reproducible stream of two-digit additions; ``start`` skips ahead (resume)."""
    rng = random.Random(seed)
    i = 0
    while True:
        a, b = rng.randrange(100), rng.randrange(100)
        if i >= start:
            yield addition_prompt(a, b)
        i += 1


# --------------------------------------------------------------------------- dataset specs
DEFAULT_TASK = "math_exact"
DATA_EXTRA = "pip install 'gspo-pipeline[data]'"


@dataclass(frozen=True)
class DatasetSpec:
    """Where prompts come from and how rows are read (see the module docstring for the string form)."""

    source: str  # "addition", a JSONL/Parquet path, or "hf:<hub name or directory>"
    split: str | None = None  # hf: only; None = "train" for training, "test" for eval_rows
    config: str | None = None  # hf: dataset configuration name (e.g. gsm8k's "main")
    task: str = DEFAULT_TASK  # reward of rows without a task column
    shuffle: bool = False  # a new order every epoch (seed + epoch)
    columns: Mapping[str, str] = field(default_factory=dict)  # field or meta key -> dataset column
    cache_dir: str | None = None  # hf: names: the datasets cache (default: HF_DATASETS_CACHE)

    @property
    def kind(self) -> str:
        if self.source == "addition":
            return "addition"
        if self.source.startswith("hf:"):
            return "hf"
        p = Path(self.source)
        if p.suffix == ".parquet" or (p.is_dir() and any(p.rglob("*.parquet"))):
            return "parquet"
        return "jsonl"


_SPEC_KEYS = ("split", "config", "task", "shuffle", "columns", "cache_dir")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_columns(text: str) -> dict[str, str]:
    """``"prompt:question,answer:solution"`` -> ``{"prompt": "question", "answer": "solution"}``."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        target, sep, column = part.partition(":")
        if not sep or not target.strip() or not column.strip():
            raise TaskError(f"columns: {part!r} is not 'field:column' (e.g. prompt:question,answer:solution)")
        out[target.strip()] = column.strip()
    return out


def parse_dataset_spec(spec: str | DatasetSpec) -> DatasetSpec:
    """``SOURCE[?key=value&...]`` -> DatasetSpec (keys: split, config, task, shuffle, columns, cache_dir;
    values may be %-encoded)."""
    if isinstance(spec, DatasetSpec):
        return spec
    source, _, query = spec.strip().partition("?")
    if not source:
        raise TaskError(f"dataset spec {spec!r} has no source")
    opts: dict[str, Any] = {}
    for part in filter(None, query.split("&")):
        key, eq, value = part.partition("=")
        key, value = key.strip(), unquote(value.strip())
        if not eq or key not in _SPEC_KEYS:
            raise TaskError(
                f"dataset spec {spec!r}: unknown option {part!r}; options: {', '.join(_SPEC_KEYS)}"
            )
        if key == "shuffle":
            if value.lower() not in _TRUE + _FALSE:
                raise TaskError(f"dataset spec {spec!r}: shuffle={value!r} is not 1/0/true/false")
            opts[key] = value.lower() in _TRUE
        elif key == "columns":
            opts[key] = parse_columns(value)
        else:
            opts[key] = value or None
    if "task" in opts:
        opts["task"] = opts["task"] or DEFAULT_TASK
    out = DatasetSpec(source, **opts)
    if out.kind != "hf" and (out.split is not None or out.config is not None):
        raise TaskError(f"dataset spec {spec!r}: split/config apply to hf: sources only")
    return out


# --------------------------------------------------------------------------- row tables
class RowTable:
    """The rows of one dataset split, in file order, with random access (converted on access)."""

    def __init__(self, name: str, n: int, get: Callable[[int], PromptRow]):
        self.name, self._n, self._get = name, n, get

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> PromptRow:
        if not 0 <= i < self._n:
            raise IndexError(f"row {i} of {self.name} ({self._n} rows)")
        return self._get(i)

    def __iter__(self) -> Iterator[PromptRow]:
        return (self._get(i) for i in range(self._n))


def _jsonl_table(path: Path, default_task: str, columns: Mapping[str, str]) -> RowTable:
    if not path.exists():
        raise TaskError(f"dataset {path} does not exist")
    if path.is_dir():
        raise TaskError(
            f"dataset {path} is a directory without *.parquet files (a JSONL dataset is one file)"
        )
    rows: list[PromptRow] = []
    prompt_col = columns.get("prompt", "prompt")
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{where}: not valid JSON: {e}") from None
            if not isinstance(obj, dict) or obj.get(prompt_col) is None:
                raise TaskError(f"{where}: each line needs a string {prompt_col!r} field")
            rows.append(_make_row(obj, columns, default_task, f"{path.stem}-{lineno}", where))
    return RowTable(str(path), len(rows), rows.__getitem__)


def _import_pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise TaskError(f"reading Parquet files needs pyarrow: {DATA_EXTRA}") from None
    return pyarrow


def _arrow_table(
    table: Any, name: str, id_prefix: str, default_task: str, columns: Mapping[str, str]
) -> RowTable:
    """Rows of a pyarrow Table; the columns and the task names are checked up front."""
    import pyarrow.compute as pc

    names = set(table.column_names)
    prompt_col = columns.get("prompt", "prompt")
    missing = sorted(({prompt_col} | {c for t, c in columns.items() if t not in ("task", "id")}) - names)
    if missing:
        raise TaskError(
            f"dataset {name}: no column {missing} (columns: {sorted(names)}); map one with columns="
        )
    if table.num_rows and table.column(prompt_col).null_count:
        raise TaskError(f"dataset {name}: column {prompt_col!r} (the prompt) has null values")
    get_reward(default_task)
    task_col = columns.get("task", "task")
    if task_col in names:
        for t in pc.unique(table.column(task_col)).to_pylist():
            if t is not None:
                get_reward(str(t))

    def get(i: int) -> PromptRow:
        obj = table.slice(i, 1).to_pylist()[0]
        return _make_row(obj, columns, default_task, f"{id_prefix}-{i}", f"{name} row {i}")

    return RowTable(name, table.num_rows, get)


def _parquet_table(path: Path, default_task: str, columns: Mapping[str, str]) -> RowTable:
    pa = _import_pyarrow()
    if not path.exists():
        raise TaskError(f"dataset {path} does not exist")
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise TaskError(f"dataset {path}: no *.parquet files")
    try:
        tables = [pa.parquet.read_table(f, memory_map=True) for f in files]
        table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
    except (OSError, pa.ArrowException) as e:
        raise TaskError(f"dataset {path}: cannot read Parquet: {e}") from None
    return _arrow_table(table, str(path), path.stem, default_task, columns)


def _import_datasets() -> Any:
    """``datasets`` in offline mode (HF_DATASETS_OFFLINE=1 unless the environment says otherwise)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import datasets
    except ImportError:
        raise TaskError(f"hf: sources need the datasets package: {DATA_EXTRA}") from None
    if os.environ["HF_DATASETS_OFFLINE"].upper() in ("1", "ON", "YES", "TRUE"):
        datasets.config.HF_HUB_OFFLINE = True  # also when datasets was imported before the variable was set
        datasets.config.HF_DATASETS_OFFLINE = True
    datasets.disable_progress_bars()
    return datasets


def _hf_dataset(spec: DatasetSpec, split: str) -> tuple[Any, str]:
    """(a datasets.Dataset, its name) for an hf: spec: a save_to_disk directory, a directory of data files,
    or a hub name from the local cache."""
    datasets = _import_datasets()
    target = spec.source[3:]
    if not target:
        raise TaskError("hf: needs a dataset name or directory, e.g. hf:openai/gsm8k or hf:/data/my_dataset")
    path = Path(target).expanduser()
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise TaskError(
                    f"dataset {path} has no split {split!r}; splits: {sorted(loaded)} (use split=)"
                )
            return loaded[split], f"{path.name}-{split}"
        if spec.split is not None and loaded.split is not None and str(loaded.split) != spec.split:
            raise TaskError(f"dataset {path} holds split {loaded.split!r}, not {spec.split!r}")
        return loaded, path.name
    where = path if path.is_dir() else target
    try:
        ds = datasets.load_dataset(str(where), spec.config, split=split, cache_dir=spec.cache_dir)
    except ValueError as e:  # unknown split, config not in the cache
        raise TaskError(f"hf dataset {target!r} (config {spec.config!r}, split {split!r}): {e}") from None
    except (ConnectionError, FileNotFoundError) as e:
        cache = spec.cache_dir or datasets.config.HF_DATASETS_CACHE
        raise TaskError(
            f"hf dataset {target!r} (config {spec.config!r}, split {split!r}) is not in the datasets cache "
            f"{cache} and the hub is offline: on a machine with hub access run "
            f"datasets.load_dataset({target!r}, {spec.config!r}) and copy the cache (HF_DATASETS_CACHE), or "
            f"save_to_disk() it and use hf:<that directory> ({type(e).__name__}: {e})"
        ) from None
    return ds, f"{Path(target).name}-{split}"


def open_dataset(spec: str | DatasetSpec, *, default_split: str = "train") -> RowTable:
    """The rows of a finite dataset spec (not ``addition``), in file order, checked up front where cheap:
    JSONL rows all at once, Parquet/Arrow columns and task names (a bad value in one row is a TaskError
    when that row is read)."""
    s = parse_dataset_spec(spec)
    kind = s.kind
    if kind == "addition":
        raise TaskError("the addition task is endless: use dataset_rows('addition', seed)")
    if kind == "jsonl":
        return _jsonl_table(Path(s.source), s.task, s.columns)
    if kind == "parquet":
        return _parquet_table(Path(s.source), s.task, s.columns)
    split = s.split or default_split
    ds, name = _hf_dataset(s, split)
    table = ds.with_format("arrow")[:]  # zero-copy slice of the memory-mapped table
    return _arrow_table(table, f"hf:{name}", name, s.task, s.columns)


def jsonl_rows(
    path: str | Path, default_task: str = DEFAULT_TASK, *, columns: Mapping[str, str] | None = None
) -> Iterator[PromptRow]:
    """Rows of a JSONL file: ``{"prompt": ..., "answer": ..., ["task"], ["id"], ...}``; all other fields go to
    meta. The prompt is a string or a list of chat messages. The whole file is checked before the first row."""
    yield from _jsonl_table(Path(path), default_task, columns or {})


def parquet_rows(
    path: str | Path, default_task: str = DEFAULT_TASK, *, columns: Mapping[str, str] | None = None
) -> Iterator[PromptRow]:
    """Rows of a Parquet file (or of every ``*.parquet`` under a directory, in name order), as ``jsonl_rows``."""
    yield from _parquet_table(Path(path), default_task, columns or {})


def hf_rows(
    name_or_dir: str,
    split: str = "train",
    default_task: str = DEFAULT_TASK,
    *,
    config: str | None = None,
    columns: Mapping[str, str] | None = None,
    cache_dir: str | None = None,
) -> Iterator[PromptRow]:
    """Rows of a Hugging Face dataset split: a ``save_to_disk`` directory, or a hub name from the cache
    (offline), as ``jsonl_rows``."""
    spec = DatasetSpec(
        f"hf:{name_or_dir}", split, config, default_task, False, dict(columns or {}), cache_dir
    )
    yield from open_dataset(spec)


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The row order of one epoch: file order, or a permutation drawn with ``random.Random(seed + epoch)``."""
    order = list(range(n))
    if shuffle:
        random.Random(seed + epoch).shuffle(order)
    return order


def dataset_rows(spec: str | DatasetSpec, seed: int = 0, start: int = 0) -> Iterator[PromptRow]:
    """``addition`` (built-in, endless) or a dataset spec, cycled without end; skips ``start`` rows (resume).

    Position ``p`` is row ``order_e[p mod n]`` of epoch ``e = p // n``, where ``order_e`` is file order or,
    with ``shuffle``, the permutation of seed ``seed + e``; its id is ``{row id}@{e}``."""
    s = parse_dataset_spec(spec)
    if s.kind == "addition":
        yield from addition_rows(seed, start)
        return
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    table = open_dataset(s)
    n = len(table)
    if not n:
        raise TaskError(f"dataset {s.source} has no rows")
    epoch, j = divmod(start, n)
    while True:
        order = epoch_order(n, seed, epoch, s.shuffle)
        for k in range(j, n):
            r = table[order[k]]
            yield replace(r, prompt_id=f"{r.prompt_id}@{epoch}")
        epoch, j = epoch + 1, 0


def eval_rows(spec: str | DatasetSpec, *, limit: int | None = None) -> Iterator[PromptRow]:
    """One pass over an evaluation set, in file order, ids without an epoch suffix: hf: sources read split
    ``test`` unless the spec names one (``?split=validation``); files are read whole. ``limit``: the first N."""
    s = parse_dataset_spec(spec)
    if s.kind == "addition":
        raise TaskError("the addition task has no eval split: give a file or an hf: dataset")
    table = open_dataset(s, default_split="test")
    n = len(table) if limit is None else min(limit, len(table))
    for i in range(n):
        yield table[i]
