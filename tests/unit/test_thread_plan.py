"""gspo up's thread rule (ops/threads.py): explicit values win, otherwise producers get 1 thread each and
the learner the cores they leave plus one (shared with the producers), at least 1."""

from ops.threads import thread_plan


def test_learner_gets_the_cores_the_producers_leave():
    assert (thread_plan(1, cores=2).learner, thread_plan(1, cores=2).producer) == (2, 1)
    assert thread_plan(2, cores=8).learner == 7
    assert thread_plan(2, learner_ranks=2, cores=8).learner == 3
    assert thread_plan(0, cores=4).learner == 4  # no producer to share a core with


def test_never_below_one_thread():
    plan = thread_plan(4, cores=2)
    assert (plan.learner, plan.producer) == (1, 1)


def test_explicit_values_win():
    plan = thread_plan(1, learner_threads=2, producer_threads=3, cores=2)
    assert (plan.learner, plan.producer) == (2, 3)
    assert "as given" in plan.describe()
    assert thread_plan(1, producer_threads=2, cores=8).learner == 7


def _spawned_env(tmp_path, monkeypatch, value: str | None) -> dict[str, str]:
    import json
    import sys

    from ops.launcher import LocalCluster

    if value is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", value)
    cluster = LocalCluster(run="t", run_dir=tmp_path, redis_url="redis://127.0.0.1:1/0", model="m")
    out = tmp_path / "env.json"
    code = f"import json, os; open({str(out)!r}, 'w').write(json.dumps(dict(os.environ)))"
    child = cluster._spawn("probe", [sys.executable, "-c", code], threads=3)
    assert child.proc.wait(timeout=60) == 0
    return json.loads(out.read_text())


def test_started_processes_wait_passively_unless_the_environment_says(tmp_path, monkeypatch):
    env = _spawned_env(tmp_path, monkeypatch, None)
    assert (env["OMP_WAIT_POLICY"], env["OMP_NUM_THREADS"]) == ("PASSIVE", "3")
    assert "OpenMP waits passive" in thread_plan(1, cores=2).describe()
    assert _spawned_env(tmp_path, monkeypatch, "ACTIVE")["OMP_WAIT_POLICY"] == "ACTIVE"
