"""Security: a password + an ACL user confined to the run's keys, TLS with a private CA, no credential in
any file the run writes, and nothing ever unpickled.

Elsewhere: the producer loads only checkpoints whose manifest verifies (tests/integration/test_producer.py::
test_corrupt_checkpoint_is_refused_and_a_good_one_loaded, test_checkpoint_of_another_model_is_refused); a pickle
planted in trainer_state/ is never read (tests/integration/test_checkpoint.py::test_a_planted_pickle_is_never_loaded);
the README's ACL line grants exactly the commands used (tests/unit/test_ops_recipes.py).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from common.feeder import task_for
from common.keys import RunKeys
from common.manifest import MANIFEST, Manifest, hash_tree, read_manifest, verify_checkpoint
from common.redis_conn import RedisServer, find_redis_server, free_port
from common.tasks import addition_prompt
from common.wire import RolloutGroup, decode, encode
from tests.chaos.conftest import REPO, learner_args, metric_rows, producer_args, report, wait_until

SOURCE_DIRS = ("common", "producer", "learner", "gspo", "ops")
UNSAFE = [
    (
        re.compile(r"^\s*(import|from)\s+(c?pickle|cloudpickle|dill|joblib|shelve)\b", re.M),
        "imports a pickle library",
    ),
    (re.compile(r"\b(c?pickle|cloudpickle|dill|joblib)\.(load|loads|Unpickler)\b"), "unpickles"),
    (
        re.compile(r"torch\.load\((?![^)]*weights_only\s*=\s*True)[^)]*\)", re.S),
        "torch.load without weights_only=True",
    ),
    (re.compile(r"allow_pickle\s*=\s*True"), "numpy allow_pickle=True"),
    (re.compile(r"\buse_safetensors\s*=\s*False"), "transformers use_safetensors=False"),
]


def gspo(*args: str, env: dict[str, str], timeout_s: float = 60) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("GSPO_", "LEARNER_TEST_"))}
    return subprocess.run([sys.executable, "-m", "gspo", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout_s, env={**clean, "PYTHONPATH": str(REPO), **env})  # fmt: skip


def files_holding(root: Path, secret: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def readme_acl(run: str, user: str, password: str) -> list[str]:
    """The ACL SETUSER line of ops/README.md, for ``run``."""
    (line,) = re.findall(r"^ACL SETUSER .*$", (REPO / "ops" / "README.md").read_text(), flags=re.M)
    line = (
        line.replace("gspo-exp1", user)
        .replace("gspo:exp1:", f"gspo:{run}:")
        .replace(">PASSWORD", f">{password}")
    )
    return line.split()


# --------------------------------------------------------------------------- password + ACL
@pytest.mark.redis
@pytest.mark.slow
def test_acl_user_confined_to_the_run_trains_and_no_credential_is_written(
    services, run_id, tiny_model_dir, tmp_path
):
    admin_pw, user_pw = f"adm-{secrets.token_hex(8)}", f"pw-{secrets.token_hex(12)}"
    server = RedisServer(tmp_path / "redis", password=admin_pw).start()
    try:
        admin = redis.Redis(port=server.port, password=admin_pw)
        user = f"gspo-{run_id}"
        assert admin.execute_command(*readme_acl(run_id, user, user_pw)) in (b"OK", "OK", True)
        url = f"redis://{user}:{user_pw}@127.0.0.1:{server.port}/0"
        env, run_dir = {"GSPO_REDIS_URL": url}, tmp_path / "run"  # from the environment: never in argv
        largs = learner_args(None, run_id, tiny_model_dir, run_dir, max_steps=3, batch_groups=2, publish_every=1,
                             extra=("--log-level", "DEBUG"))  # fmt: skip
        learner = services.start("learner", largs, "learner", env=env)
        producer = services.start("producer", producer_args(None, run_id, tiny_model_dir, run_dir, "p1"),
                                  "p1", env=env)  # fmt: skip
        assert learner.wait(90) == 0, learner.tail()
        assert producer.terminate() == 0, producer.tail()
        assert [r["step"] for r in metric_rows(run_dir)] == [1, 2, 3]
        assert f"redis://{user}:***@127.0.0.1:{server.port}/0" in learner.text()  # logged, masked
        # confined: nothing outside gspo:{run}:*, no admin commands
        confined = redis.Redis.from_url(url)
        assert confined.exists(RunKeys(run_id).latest) == 1
        for forbidden in (lambda: confined.get("gspo:another-run:latest"), lambda: confined.set("x", 1),
                          lambda: confined.keys("*"), lambda: confined.flushall(), lambda: confined.config_get("*")):  # fmt: skip
            with pytest.raises(redis.exceptions.NoPermissionError):
                forbidden()
        # a wrong password: one line, no traceback, no password echoed
        wrong = gspo(
            "status", "--run", run_id, env={"GSPO_REDIS_URL": url.replace(user_pw, "not-the-password")}
        )
        assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
        assert wrong.stderr.strip().count("\n") == 0 and "refused the credentials" in wrong.stderr, (
            wrong.stderr
        )
        assert "not-the-password" not in wrong.stderr
        for text in (learner.text(), producer.text()):
            assert user_pw not in text and admin_pw not in text
        assert files_holding(run_dir, user_pw) == [] and files_holding(run_dir, admin_pw) == []
        assert any((run_dir / "logs").iterdir()) and any(
            (run_dir / "metrics").iterdir()
        )  # the scan saw files
    finally:
        server.stop()
    report("acl", {"steps": 3, "files_scanned": sum(1 for p in run_dir.rglob("*") if p.is_file()),
                   "files_with_password": 0})  # fmt: skip


# --------------------------------------------------------------------------- TLS
def make_certs(d: Path) -> tuple[Path, Path, Path]:
    """A private CA and a server certificate for 127.0.0.1 (EC keys: fast), with the openssl CLI."""
    d.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run = lambda *a: subprocess.run(["openssl", *a], cwd=d, check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1", "-subj", "/CN=gspo-test-ca")
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "1", "-extfile", "san.ext")  # fmt: skip
    return d / "ca.crt", d / "server.crt", d / "server.key"


@pytest.fixture
def tls_redis(tmp_path: Path):
    ca, cert, key = make_certs(tmp_path / "pki")
    port = free_port()
    proc = subprocess.Popen([find_redis_server(), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                             "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca),
                             "--tls-auth-clients", "no", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    client = redis.Redis(port=port, ssl=True, ssl_ca_certs=str(ca))

    def ready() -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            assert proc.poll() is None, "redis-server refused the TLS options (built without TLS?)"
            return False

    wait_until(ready, 10, "redis-server with TLS")
    yield f"rediss://127.0.0.1:{port}/0", ca, client
    client.close()
    proc.terminate()
    proc.wait(10)


@pytest.mark.redis
@pytest.mark.slow
def test_tls_with_a_private_ca_serves_status_and_a_producer(
    tls_redis, services, run_id, tiny_model_dir, tmp_path
):
    url, ca, client = tls_redis
    env = {"GSPO_REDIS_URL": url, "GSPO_REDIS__CA_FILE": str(ca)}
    keys = RunKeys(run_id)
    for i in range(2):
        client.xadd(keys.prompts, {b"m": encode(task_for(addition_prompt(i, 7), f"tls-{i}"))})
    status = gspo("status", "--json", "--run", run_id, env=env)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["streams"]["prompts"]["length"] == 2
    untrusted = gspo(
        "status", "--run", run_id, env={"GSPO_REDIS_URL": url}
    )  # the system CAs do not know ours
    assert untrusted.returncode == 2 and "Traceback" not in untrusted.stderr
    assert untrusted.stderr.strip().count("\n") == 0 and "certificate verify failed" in untrusted.stderr
    plain = gspo("status", "--run", run_id, env={"GSPO_REDIS_URL": url.replace("rediss://", "redis://")})
    assert plain.returncode == 2 and plain.stderr.startswith("error: cannot reach Redis"), plain.stderr
    args = producer_args(None, run_id, tiny_model_dir, tmp_path / "run", "p1", extra=("--max-groups", "2"))
    producer = services.start("producer", args, "p1", env=env)
    assert producer.wait(90) == 0, producer.tail()
    groups = [decode(f[b"m"], RolloutGroup) for _, f in client.xrange(keys.rollouts)]
    assert sorted(g.group_id for g in groups) == ["tls-0", "tls-1"]


# --------------------------------------------------------------------------- never unpickle
def test_no_code_path_can_unpickle():
    found = []
    for d in SOURCE_DIRS:
        for path in sorted((REPO / d).rglob("*.py")):
            text = path.read_text()
            found += [f"{path.relative_to(REPO)}: {why}" for rx, why in UNSAFE if rx.search(text)]
    assert found == []
    # the scan does find what it looks for
    probe = "import pickle\nx = torch.load(f)\ny = torch.load(g, weights_only=True)\nnp.load(h, allow_pickle=True)\n"
    assert [why for rx, why in UNSAFE if rx.search(probe)] == [
        "imports a pickle library", "torch.load without weights_only=True", "numpy allow_pickle=True"]  # fmt: skip


class _Bomb:
    """Unpickling this runs code: it creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def _plant(step_dir: Path, marker: Path, *, drop_safetensors: bool) -> None:
    """Pickle bombs under every name a PyTorch/HF stack might unpickle, in the published step and in its
    learner-private state (RUN_DIR/learner-state), with both manifests re-hashed: the worst case, someone with
    write access to the checkpoint store (the manifest alone cannot stop that)."""
    bomb = pickle.dumps(_Bomb(marker))
    private = step_dir.parent.parent / "learner-state" / step_dir.name
    (step_dir / "trainer_state").mkdir()
    for rel in ("pytorch_model.bin", "training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                "trainer_state/optimizer.pt", "trainer_state/rng_state.pth", "trainer_state/trainer_state.pkl"):  # fmt: skip
        (step_dir / rel).write_bytes(bomb)
    # optimizer/.metadata and *.distcp: the pickled index and data of torch.distributed.checkpoint's own format
    for rel in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.pkl", "adapter_model.bin",
                "optimizer/.metadata", "optimizer/__0_0.distcp"):  # fmt: skip
        (private / rel).parent.mkdir(exist_ok=True)
        (private / rel).write_bytes(bomb)
    if drop_safetensors:
        for f in [*step_dir.glob("*.safetensors"), step_dir / "model.safetensors.index.json"]:
            f.unlink(missing_ok=True)
    for d in (step_dir, private):
        old, _ = read_manifest(d)
        files = hash_tree(d)
        m = Manifest(old.step, old.version, old.parent, old.model_fingerprint, files, old.created_at)
        (d / MANIFEST).write_bytes(m.to_json())
        verify_checkpoint(d)


@pytest.mark.redis
async def test_pickles_planted_in_a_checkpoint_are_never_unpickled_on_resume(tiny_model_dir, redis_url, run_id,
                                                                            aredis, tmp_path):  # fmt: skip
    from learner.service import main
    from producer.engines.hf import HFEngine
    from tests.integration.test_learner_service import (
        learner_settings,
        make_groups,
        read_metrics,
        run_learner,
    )

    keys, run_dir, marker = RunKeys(run_id), tmp_path / "run", tmp_path / "MARKER"
    for g in make_groups(tiny_model_dir, 4):
        await aredis.xadd(keys.rollouts, {b"m": encode(g)})
    assert await run_learner(main, learner_settings(run_id, redis_url, run_dir, tiny_model_dir, max_steps=1,
                                                    publish_every=1)) == 0  # fmt: skip
    step1 = run_dir / "checkpoints" / "step_00000001"
    _plant(step1, marker, drop_safetensors=False)
    # resume: safetensors and JSON are read, none of the planted files
    resumed = learner_settings(run_id, redis_url, run_dir, tiny_model_dir, max_steps=2, publish_every=1)
    assert await run_learner(main, resumed, resume=True) == 0
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2] and not marker.exists()
    HFEngine(str(step1)).load_weights_sync(step1, 1)  # the producer's reload reads *.safetensors only
    assert not marker.exists()
    # with the safetensors weights gone, the pickled pytorch_model.bin is refused, not loaded
    step2 = run_dir / "checkpoints" / "step_00000002"
    _plant(step2, marker, drop_safetensors=True)
    t0 = time.monotonic()
    again = learner_settings(run_id, redis_url, run_dir, tiny_model_dir, max_steps=3, publish_every=1)
    assert await run_learner(main, again, resume=True) == 2  # one error line: no safetensors weights
    assert not marker.exists() and time.monotonic() - t0 < 30
