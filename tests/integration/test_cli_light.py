"""The light `gspo` commands, run as real subprocesses (`python -m gspo`): config, prompts, status, redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from common.keys import PRODUCERS_GROUP, RunKeys
from common.redis_conn import free_port
from common.wire import PromptTask, decode

REPO = Path(__file__).resolve().parents[2]


def gspo(*args: str, cwd: Path, timeout_s: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GSPO_")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "gspo", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def stream_tasks(url: str, run: str) -> list[PromptTask]:
    c = redis.Redis.from_url(url)
    try:
        return [decode(f[b"m"], expect=PromptTask) for _, f in c.xrange(RunKeys(run).prompts)]
    finally:
        c.close()


def write_jsonl(path: Path, rows: list[dict | str]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_config_show_prints_the_resolved_config_as_json(tmp_path):
    cfg = tmp_path / "gspo.toml"
    cfg.write_text('[learner]\nlr = 1e-4\n[redis]\nurl = "redis://u:topsecret@h:6379/0"\n')
    r = gspo("config", "show", "--config", str(cfg), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert shown["learner"]["lr"] == 1e-4 and shown["pipeline"]["batch_groups"] == 32
    assert shown["redis"]["url"] == "redis://u:***@h:6379/0" and "topsecret" not in r.stdout


def test_config_show_with_an_unknown_key_exits_2_with_one_line(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[pipeline]\ngroup_sise = 8\n")
    r = gspo("config", "show", "-c", str(cfg), cwd=tmp_path)
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "pipeline.group_sise: unknown key" in lines[0] and str(cfg) in lines[0]


@pytest.mark.redis
def test_prompts_load_enqueues_prompt_tasks_with_stable_ids(tmp_path, redis_url, run_id):
    data = write_jsonl(
        tmp_path / "math.jsonl",
        [
            {"prompt": "What is 2+3?", "answer": "5"},
            {"prompt": "12+34=", "answer": "46", "task": "addition", "id": "add-12-34"},
            "",
            {"prompt": "7*6=", "answer": 42, "task": "exact_match", "source": "x"},
        ],
    )
    r = gspo("prompts", "load", str(data), "--redis-url", redis_url, "--run", run_id, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"enqueued 3 prompts on gspo:{run_id}:prompts"
    tasks = stream_tasks(redis_url, run_id)
    assert [(t.prompt, t.task) for t in tasks] == [
        ("What is 2+3?", "math_exact"),
        ("12+34=", "addition"),
        ("7*6=", "exact_match"),
    ]
    assert tasks[0].meta == {"answer": "5", "prompt_id": "math-1"}
    assert tasks[1].meta == {"answer": "46", "prompt_id": "add-12-34"}
    assert tasks[2].meta == {"answer": 42, "source": "x", "prompt_id": "math-4"}
    assert len({t.task_id for t in tasks}) == 3
    c = redis.Redis.from_url(redis_url)
    assert [g["name"] for g in c.xinfo_groups(RunKeys(run_id).prompts)] == [PRODUCERS_GROUP.encode()]
    c.close()

    again = gspo("prompts", "load", str(data), "--redis-url", redis_url, "--run", run_id, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    twice = stream_tasks(redis_url, run_id)
    assert [t.task_id for t in twice[3:]] == [t.task_id for t in tasks]  # same file -> same group ids


@pytest.mark.redis
def test_prompts_load_names_file_and_line_of_a_row_without_prompt(tmp_path, redis_url, run_id):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "1+1=", "answer": "2"}, {"answer": "3"}])
    r = gspo("prompts", "load", str(data), "--redis-url", redis_url, "--run", run_id, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: {data}:2: each line needs a string 'prompt' field"]
    assert stream_tasks(redis_url, run_id) == []  # nothing half-loaded


@pytest.mark.redis
def test_status_json_reports_stream_lengths(tmp_path, redis_url, run_id):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(4)])
    assert (
        gspo("prompts", "load", str(data), "--redis-url", redis_url, "--run", run_id, cwd=tmp_path).returncode
        == 0
    )
    c = redis.Redis.from_url(redis_url)
    c.xreadgroup(PRODUCERS_GROUP, "p1", {RunKeys(run_id).prompts: ">"}, count=1)
    c.hset(RunKeys(run_id).learner_state, mapping={"version": 2, "consumed": 5, "step": 2})
    c.close()
    r = gspo("status", "--redis-url", redis_url, "--run", run_id, "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["run"] == run_id
    assert info["streams"]["prompts"] == {"length": 4, "backlog": 3, "pending": 1}
    assert info["streams"]["rollouts"] == {"length": 0, "backlog": 0, "pending": 0}
    assert info["streams"]["dead"] == {"length": 0}
    assert info["learner"] == {"version": "2", "consumed": "5", "step": "2"}
    assert (info["producers"], info["latest_checkpoint"], info["admitted_groups"]) == ([], None, 0)


def test_status_with_nothing_listening_fails_with_one_line(tmp_path):
    port = free_port()
    r = gspo("status", "--redis-url", f"redis://user:pw123@127.0.0.1:{port}/0", "--run", "r", cwd=tmp_path)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith(f"error: cannot reach Redis at redis://user:***@127.0.0.1:{port}/0")
    assert "pw123" not in r.stderr


@pytest.mark.redis
def test_embedded_redis_start_url_stop(tmp_path):
    run_dir = "rundir"  # relative on purpose: redis-server chdirs to --dir
    assert gspo("redis", "url", "--run-dir", run_dir, cwd=tmp_path).returncode == 1
    started = gspo("redis", "start", "--run-dir", run_dir, cwd=tmp_path)
    try:
        assert started.returncode == 0, started.stderr
        url = started.stdout.strip()
        assert url.startswith("redis://127.0.0.1:")
        data_dir = tmp_path / run_dir / "redis"
        assert (data_dir / "redis.pid").exists() and (data_dir / "url").read_text() == url
        c = redis.Redis.from_url(url)
        assert (
            c.config_get("dir")["dir"] == str(data_dir) and c.config_get("appendonly")["appendonly"] == "yes"
        )
        c.close()
        shown = gspo("redis", "url", "--run-dir", run_dir, cwd=tmp_path)
        assert (shown.returncode, shown.stdout.strip()) == (0, url)
        assert gspo("redis", "start", "--run-dir", run_dir, cwd=tmp_path).stdout.strip() == url  # reused
    finally:
        stopped = gspo("redis", "stop", "--run-dir", run_dir, cwd=tmp_path)
    assert (stopped.returncode, stopped.stdout.strip()) == (0, "stopped")
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(url, socket_connect_timeout=0.5).ping()
    assert gspo("redis", "url", "--run-dir", run_dir, cwd=tmp_path).returncode == 1
    assert gspo("redis", "stop", "--run-dir", run_dir, cwd=tmp_path).stdout.strip() == "not running"


def test_status_of_a_missing_run_dir_fails_without_creating_it_or_starting_redis(tmp_path):
    r = gspo("status", "--run-dir", "nowhere", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: run dir nowhere does not exist (pass the run's --run-dir, or --redis-url)"
    ]
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.redis
def test_status_of_a_finished_run_leaves_no_server_behind(tmp_path):
    """A run dir whose embedded Redis has stopped: status says so and starts nothing."""
    assert gspo("redis", "start", "--run-dir", "done", cwd=tmp_path).returncode == 0
    assert gspo("redis", "stop", "--run-dir", "done", cwd=tmp_path).stdout.strip() == "stopped"
    r = gspo("status", "--run-dir", "done", cwd=tmp_path)
    assert r.returncode == 2 and "is not running" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert gspo("redis", "url", "--run-dir", "done", cwd=tmp_path).returncode == 1  # still nothing running


@pytest.mark.redis
def test_prompts_load_never_trims_undelivered_prompts_and_refuses_past_capacity(tmp_path, redis_url, run_id):
    cfg = tmp_path / "small.toml"
    cfg.write_text("[pipeline]\nprompts_maxlen = 1000\n")
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(1000)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"{i}+2=", "answer": str(i + 2)} for i in range(5)])
    args = ("--redis-url", redis_url, "--run", run_id, "-c", str(cfg))
    r = gspo("prompts", "load", str(a), *args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"enqueued 1000 prompts on gspo:{run_id}:prompts"
    assert len(stream_tasks(redis_url, run_id)) == 1000  # all of them: none trimmed by an approximate MAXLEN
    r = gspo("prompts", "load", str(b), *args, cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and "holds 1000 entries; 5 more would exceed pipeline.prompts_maxlen=1000" in lines[0]
    )
    assert len(stream_tasks(redis_url, run_id)) == 1000


CHAT_ROWS = [
    {"messages": [{"role": "user", "content": "What is 2+3?"}], "solution": "5"},
    {
        "messages": [{"role": "system", "content": "Use LaTeX."}, {"role": "user", "content": "Half of 1?"}],
        "solution": "\\frac{1}{2}",
    },
]
TASK_TOML = """
[task]
system_prompt = "Answer in \\\\boxed{}."
[task.chat_template_kwargs]
enable_thinking = false
[[task.rewards]]
function = "math_verify"
name = "correct"
[[task.rewards]]
function = "tests.support.rewards:only_named"
name = "length"
weight = -0.01
"""


def _check_chat_tasks(tasks: list[PromptTask]) -> None:
    assert [t.prompt for t in tasks] == ["", ""]
    assert tasks[0].messages == (
        {"role": "system", "content": "Answer in \\boxed{}."},
        {"role": "user", "content": "What is 2+3?"},
    )
    assert tasks[1].messages[0] == {"role": "system", "content": "Use LaTeX."}  # the row's own system message
    assert [t.meta["answer"] for t in tasks] == ["5", "\\frac{1}{2}"]
    assert all(t.chat_template_kwargs == {"enable_thinking": False} for t in tasks)
    assert all(
        t.rewards == (("correct", "math_verify", 1.0), ("length", "tests.support.rewards:only_named", -0.01))
        for t in tasks
    )


@pytest.mark.redis
def test_prompts_load_takes_chat_prompts_from_parquet_and_hf_dirs_with_the_task_config(
    tmp_path, redis_url, run_id
):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    cfg = tmp_path / "task.toml"
    cfg.write_text(TASK_TOML)
    pq.write_table(pa.Table.from_pylist(CHAT_ROWS), tmp_path / "chat.parquet")
    spec = f"{tmp_path / 'chat.parquet'}?columns=prompt:messages,answer:solution"
    r = gspo("prompts", "load", spec, "-c", str(cfg), "--redis-url", redis_url, "--run", run_id, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    tasks = stream_tasks(redis_url, run_id)
    _check_chat_tasks(tasks)

    datasets.Dataset.from_list(CHAT_ROWS).save_to_disk(str(tmp_path / "hfdir"))
    spec = f"hf:{tmp_path / 'hfdir'}?columns=prompt:messages,answer:solution"
    r = gspo("prompts", "load", spec, "-c", str(cfg), "--redis-url", redis_url, "--run", run_id, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    more = stream_tasks(redis_url, run_id)[2:]
    _check_chat_tasks(more)
    assert {t.task_id for t in more}.isdisjoint(t.task_id for t in tasks)
    again = gspo(
        "prompts", "load", spec, "-c", str(cfg), "--redis-url", redis_url, "--run", run_id, cwd=tmp_path
    )
    assert [t.task_id for t in stream_tasks(redis_url, run_id)[4:]] == [
        t.task_id for t in more
    ]  # same rows, same ids
    assert again.returncode == 0


@pytest.mark.redis
def test_prompts_load_refuses_a_reward_it_cannot_resolve_and_a_system_prompt_for_text(
    tmp_path, redis_url, run_id
):
    data = write_jsonl(tmp_path / "text.jsonl", [{"prompt": "1+1=", "answer": "2"}])
    bad = tmp_path / "bad.toml"
    bad.write_text('[[task.rewards]]\nfunction = "no_such_module:f"\n')
    r = gspo(
        "prompts", "load", str(data), "-c", str(bad), "--redis-url", redis_url, "--run", run_id, cwd=tmp_path
    )
    assert r.returncode == 2
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("error: task.rewards (f): reward 'no_such_module:f' cannot be imported")
    sys_cfg = tmp_path / "sys.toml"
    sys_cfg.write_text('[task]\nsystem_prompt = "be brief"\n')
    r = gspo(
        "prompts",
        "load",
        str(data),
        "-c",
        str(sys_cfg),
        "--redis-url",
        redis_url,
        "--run",
        run_id,
        cwd=tmp_path,
    )
    assert r.returncode == 2
    (line,) = r.stderr.strip().splitlines()
    assert "task.system_prompt applies to chat prompts" in line
    assert stream_tasks(redis_url, run_id) == []  # nothing half-loaded


@pytest.mark.redis
def test_a_tracker_that_is_not_installed_stops_the_learner_with_one_line(
    tmp_path, redis_url, run_id, tiny_model_dir
):
    import importlib.util

    if importlib.util.find_spec("mlflow") is not None:
        pytest.skip("mlflow is installed here")
    r = gspo("learner", "--report-to", "mlflow", "--model", str(tiny_model_dir), "--redis-url", redis_url,
             "--run", run_id, "--run-dir", str(tmp_path / "run"), "--dataset", "", cwd=tmp_path, timeout_s=120)  # fmt: skip
    assert r.returncode == 2
    errors = [ln for ln in r.stderr.splitlines() if "ERROR" in ln or "Traceback" in ln]
    assert len(errors) == 1, r.stderr
    assert errors[0].endswith(
        "learner failed: learner.report_to includes 'mlflow' but the mlflow package is not installed: "
        "pip install 'gspo-pipeline[mlflow]'"
    )
    assert not (tmp_path / "run" / "checkpoints").exists() or not any(
        (tmp_path / "run" / "checkpoints").iterdir()
    )
