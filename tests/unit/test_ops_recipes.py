"""The ops/ recipes are checked by what can run here (no GPU, no Docker, no Kubernetes):

- syntax: ``bash -n``, YAML, JSON, TOML, ``systemd-analyze verify``;
- every ``gspo <command> --flag`` in them is accepted by the real CLI (``python -m gspo <command> --help``),
  and the torchrun lines parse with torchrun's own argument parser;
- every ``GSPO_*`` variable they set is a real config field;
- the shell launchers behave: ``sglang_host.sh`` against stand-in SGLang/producer processes,
  ``learner_torchrun.sh`` by the argv it would exec;
- the Grafana dashboard queries exactly the metrics ``common/prom.py`` maps, and the producer's exporter feeds
  them (a live learner and producer are scraped in ``tests/integration/test_metrics_live.py``);
- the README's Redis ACL line grants what the pipeline uses and nothing outside the run (real Redis).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from functools import cache
from pathlib import Path

import pytest

from common.config import load_settings

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[2]
OPS = REPO / "ops"
SCRIPTS = sorted(OPS.glob("*.sh"))
K8S = sorted((OPS / "k8s").glob("*.yaml"))
UNITS = sorted((OPS / "systemd").glob("*.service"))
README = OPS / "README.md"

# `gspo <command>` as written in recipes; sub-apps take two words
CMD_RE = re.compile(
    r"(?:^|[\s/\"'])gspo\s+(prompts\s+load|redis\s+(?:start|stop|url)|config\s+show|[a-z]+)\b(.*)"
)
FLAG_RE = re.compile(r"(?<![\w/.-])(--?[A-Za-z][\w-]*)")


# ---------------------------------------------------------------- extracting command lines
def _join_continuations(text: str) -> list[str]:
    return text.replace("\\\n", " ").splitlines()


def _shell_lines(path: Path) -> list[str]:
    return [ln for ln in _join_continuations(path.read_text()) if not ln.lstrip().startswith("#")]


def _readme_code_lines() -> list[str]:
    """Lines of the README's code blocks, then its inline code spans that run gspo."""
    text = README.read_text()
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    lines = [ln for b in blocks for ln in _join_continuations(b) if not ln.lstrip().startswith("#")]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    return lines + [span for span in re.findall(r"`([^`\n]+)`", prose) if span.startswith("gspo ")]


def _k8s_containers(docs: list[dict]) -> list[dict]:
    out = []
    for doc in docs:
        pod = doc.get("spec", {}).get("template", {}).get("spec", {})
        out += pod.get("initContainers", []) + pod.get("containers", [])
    return out


def _k8s_lines(path: Path) -> list[str]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    return [" ".join(c.get("command", []) + c.get("args", [])) for c in _k8s_containers(docs)]


def _lines_of(path: Path) -> list[str]:
    if path == README:
        return _readme_code_lines()
    if path.suffix == ".yaml":
        return _k8s_lines(path)
    return _shell_lines(path)


def gspo_commands(path: Path) -> list[tuple[str, list[str]]]:
    """(command, flags) for every gspo invocation in a recipe; flags stop at the end of the shell command."""
    found = []
    for line in _lines_of(path):
        for m in CMD_RE.finditer(line):
            rest = re.split(r"\s#|;|\||&", m.group(2))[0]
            found.append((" ".join(m.group(1).split()), FLAG_RE.findall(rest)))
    return found


@cache
def cli_flags(command: str) -> frozenset[str]:
    env = {**os.environ, "COLUMNS": "250", "TERMINAL_WIDTH": "250", "NO_COLOR": "1", "TERM": "dumb"}
    r = subprocess.run(
        [sys.executable, "-m", "gspo", *command.split(), "--help"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, f"gspo {command} --help failed: {r.stderr[-500:]}"
    return frozenset(FLAG_RE.findall(r.stdout))


RECIPES = [*SCRIPTS, *UNITS, *K8S, README]


def test_recipes_call_the_commands_they_should():
    """The extraction finds the invocations (so the flag check below is not vacuous)."""
    cmds = {(p.relative_to(OPS).as_posix(), c) for p in RECIPES for c, _ in gspo_commands(p)}
    expected = {
        ("sglang_host.sh", "producer"),
        ("learner_torchrun.sh", "learner"),
        ("systemd/gspo-producer@.service", "producer"),
        ("k8s/producer-deployment.yaml", "producer"),
        ("k8s/learner-statefulset.yaml", "learner"),
        ("README.md", "producer"),
        ("README.md", "learner"),
        ("README.md", "status"),
        ("README.md", "prompts load"),
        ("README.md", "redis start"),
    }
    assert expected <= cmds, expected - cmds


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(OPS).as_posix())
def test_every_gspo_flag_in_recipe_exists_in_the_cli(path):
    unknown = {(cmd, f) for cmd, flags in gspo_commands(path) for f in flags if f not in cli_flags(cmd)}
    assert not unknown, f"{path.name}: flags the CLI does not accept: {sorted(unknown)}"


def test_flag_check_catches_an_unknown_flag(tmp_path):
    bad = tmp_path / "bad.sh"
    bad.write_text("python -m gspo producer --engine sglang \\\n  --no-such-flag 3 &\n")
    ((cmd, flags),) = gspo_commands(bad)
    assert cmd == "producer" and flags == ["--engine", "--no-such-flag"]
    assert "--engine" in cli_flags("producer") and "--no-such-flag" not in cli_flags("producer")


# ---------------------------------------------------------------- syntax of every file
@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_parse_and_are_executable(path):
    r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert os.access(path, os.X_OK), f"{path} is not executable (chmod +x)"
    assert path.read_text().startswith("#!/usr/bin/env bash\n")


def test_k8s_manifests_are_well_formed():
    kinds = {}
    for path in K8S:
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc and {"apiVersion", "kind"} <= doc.keys(), path
            if doc["kind"] != "Kustomization":
                kinds[(doc["kind"], doc["metadata"]["name"])] = path.name
    kust = yaml.safe_load((OPS / "k8s" / "kustomization.yaml").read_text())
    assert all((OPS / "k8s" / r).exists() for r in kust["resources"])
    assert "secret.example.yaml" not in kust["resources"]  # the real Secret is made by hand
    assert {
        ("StatefulSet", "gspo-redis"),
        ("Service", "gspo-redis"),
        ("Deployment", "gspo-producer"),
        ("StatefulSet", "gspo-learner"),
        ("ConfigMap", "gspo-config"),
        ("Secret", "gspo-redis"),
        ("PersistentVolumeClaim", "gspo-shared"),
    } <= kinds.keys()


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((OPS / "k8s" / name).read_text()) if d]


def _workload(name: str, kind: str) -> dict:
    return next(d for d in _docs(name) if d["kind"] == kind)


def test_k8s_references_resolve():
    """Every Secret key, ConfigMap and claim a pod uses is defined by the manifests."""
    secret = _workload("secret.example.yaml", "Secret")
    config = _workload("configmap.yaml", "ConfigMap")
    claims = {
        d["metadata"]["name"] for p in K8S for d in _docs(p.name) if d["kind"] == "PersistentVolumeClaim"
    }
    for name, kind in [
        ("redis.yaml", "StatefulSet"),
        ("producer-deployment.yaml", "Deployment"),
        ("learner-statefulset.yaml", "StatefulSet"),
    ]:
        pod = _workload(name, kind)["spec"]["template"]["spec"]
        for c in _k8s_containers([_workload(name, kind)]):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"], (
                        name,
                        e,
                    )
            mounts = {m["name"] for m in c.get("volumeMounts", [])}
            assert mounts <= {v["name"] for v in pod.get("volumes", [])} | {
                t["metadata"]["name"] for t in _workload(name, kind)["spec"].get("volumeClaimTemplates", [])
            }, (name, c["name"])
        for v in pod.get("volumes", []):
            if "configMap" in v:
                assert v["configMap"]["name"] == config["metadata"]["name"]
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims


def test_producer_pod_drains_and_is_ready_on_sglang_health():
    dep = _workload("producer-deployment.yaml", "Deployment")
    pod = dep["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= 600
    (sglang,) = pod["initContainers"]
    assert sglang["restartPolicy"] == "Always"  # native sidecar: stopped after the producer
    assert sglang["readinessProbe"]["httpGet"]["path"] == "/health"
    assert sglang["startupProbe"]["httpGet"]["path"] == "/health"
    args = sglang["args"]
    assert args[args.index("--host") + 1] == "0.0.0.0"  # probes go to the pod IP
    (producer,) = pod["containers"]
    assert producer["args"][producer["args"].index("--sglang-url") + 1].endswith(
        f":{args[args.index('--port') + 1]}"
    )
    shared = {m["mountPath"] for c in (sglang, producer) for m in c["volumeMounts"] if m["name"] == "shared"}
    learner = _workload("learner-statefulset.yaml", "StatefulSet")["spec"]["template"]["spec"]["containers"][
        0
    ]
    assert shared == {m["mountPath"] for m in learner["volumeMounts"] if m["name"] == "shared"} == {"/shared"}


def test_redis_keeps_an_append_only_file_and_never_evicts():
    cmd = " ".join(
        _workload("redis.yaml", "StatefulSet")["spec"]["template"]["spec"]["containers"][0]["args"]
    )
    assert "--appendonly yes" in cmd and "--maxmemory-policy noeviction" in cmd


def test_prometheus_config_and_dashboard_parse():
    prom_cfg = yaml.safe_load((OPS / "prometheus.yml").read_text())
    assert {j["job_name"] for j in prom_cfg["scrape_configs"]} == {"gspo-learner", "gspo-producer", "sglang"}
    dash = json.loads((OPS / "grafana" / "gspo-dashboard.json").read_text())
    assert dash["panels"] and all(p["targets"] for p in dash["panels"])


def dashboard_metric_names() -> set[str]:
    dash = json.loads((OPS / "grafana" / "gspo-dashboard.json").read_text())
    return {n for p in dash["panels"] for t in p["targets"] for n in re.findall(r"\bgspo_[a-z_]+", t["expr"])}


def test_dashboard_queries_exactly_the_mapped_metrics():
    from common.prom import metric_names

    assert dashboard_metric_names() == metric_names("learner") | metric_names("producer")


def test_producer_exporter_feeds_every_producer_metric_of_the_dashboard(tmp_path):
    """The producer's heartbeat-time export goes through common/prom.py (no private registry)."""
    from common import prom
    from common.wire import ProducerHeartbeat
    from producer.metrics import MetricsExporter, ProducerMetrics

    settings = load_settings(None, {"run_dir": str(tmp_path), "metrics_port": 0}, env={})
    exporter = MetricsExporter(settings, "p1")
    m = ProducerMetrics(groups_total=3, paced_s_total=0.5, weight_version=2, weight_sync_s=1.5)
    hb = ProducerHeartbeat(
        producer_id="p1",
        host="h",
        engine="e",
        version=2,
        groups_done=3,
        tokens_per_s=40.0,
        groups_per_s=1.0,
        inflight=0,
        state="idle",
        started_at=0.0,
    )
    exporter.export(m, hb)
    exporter.close()
    registry = prom.registry("producer")
    got = {n: registry.get_sample_value(n) for n in dashboard_metric_names() & prom.metric_names("producer")}
    assert got == {
        "gspo_producer_groups_total": 3,
        "gspo_producer_paced_seconds_total": 0.5,
        "gspo_producer_tokens_per_second": 40.0,
        "gspo_producer_weight_version": 2,
        "gspo_weight_sync_seconds": 1.5,
    }
    row = json.loads((tmp_path / "metrics" / "producer-p1.jsonl").read_text())
    assert (row["groups_total"], row["tokens_per_s"]) == (3, 40.0)


# ---------------------------------------------------------------- systemd
def test_units_keep_secrets_in_the_environment_file():
    for unit in UNITS:
        text = unit.read_text()
        assert "EnvironmentFile=/etc/gspo/gspo.env" in text
        settings = "\n".join(ln for ln in text.splitlines() if not ln.startswith("#"))
        assert not re.search(r"rediss?://|password|requirepass|GSPO_REDIS", settings, flags=re.I), unit.name
        assert re.search(r"^KillSignal=SIGTERM$", text, flags=re.M) and "TimeoutStopSec=" in text


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_units_verify(tmp_path):
    for unit in UNITS:  # instantiate @0; point ExecStart at an interpreter that exists here
        text = re.sub(r"^ExecStart=\S+", f"ExecStart={sys.executable}", unit.read_text(), flags=re.M)
        (tmp_path / unit.name.replace("@.", "@0.")).write_text(text)
    r = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *sorted(str(p) for p in tmp_path.iterdir())],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr


# ---------------------------------------------------------------- config keys the recipes set
def _assert_config_env(name: str, value: str) -> None:
    if name == "GSPO_CONFIG":
        return
    load_settings(None, env={name: value})  # raises ConfigError naming the key if it is not a field


def test_env_file_example_sets_only_real_config_fields():
    pairs = [
        ln.split("=", 1)
        for ln in (OPS / "systemd" / "gspo.env.example").read_text().splitlines()
        if ln and not ln.startswith("#")
    ]
    assert {"MODEL_PATH", "GSPO_RUN", "GSPO_REDIS_URL"} <= {k for k, _ in pairs}
    settings = load_settings(None, env={k: v for k, v in pairs if k.startswith("GSPO_")})
    assert settings.redis.url.startswith("rediss://") and settings.redis.ca_file
    commented = re.findall(
        r"^# (GSPO_\w+)=(\S+)", (OPS / "systemd" / "gspo.env.example").read_text(), flags=re.M
    )
    for name, value in commented:
        _assert_config_env(name, value)


def test_configmap_toml_is_a_valid_config(tmp_path):
    toml_text = _workload("configmap.yaml", "ConfigMap")["data"]["gspo.toml"]
    (tmp_path / "gspo.toml").write_text(toml_text)
    settings = load_settings(tmp_path / "gspo.toml", env={})
    assert settings.run == tomllib.loads(toml_text)["run"]


def test_k8s_and_scripts_set_only_real_config_fields():
    names = []
    for path in K8S:
        for c in _k8s_containers(_docs(path.name)):
            names += [(e["name"], e.get("value", "redis://h:6379/0")) for e in c.get("env", [])]
    for path in SCRIPTS:
        names += re.findall(r"export (GSPO_\w+)=\"?([^\"\s]+)", path.read_text())
    gspo = [(n, v) for n, v in names if n.startswith("GSPO_")]
    assert ("GSPO_PRODUCER__ROUTER_URL", "$SGLANG_ROUTER_URL") in gspo
    for name, value in gspo:
        _assert_config_env(name, "http://router:30000" if value.startswith("$") else value)


# ---------------------------------------------------------------- the launchers' behaviour
FAKE_SGLANG = """\
#!{python}
import http.server, json, os, signal, sys, threading, time
args = sys.argv[1:]
port = int(args[args.index("--port") + 1])
events = os.environ["EVENTS"]
def note(s):
    with open(events, "a") as f:
        f.write(s + "\\n")
note("sglang-started " + json.dumps(args))
t0 = time.monotonic()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.path == "/health" and time.monotonic() - t0 > 0.5  # 503 while "loading"
        self.send_response(200 if ok else 503); self.end_headers()
    def log_message(self, *a): pass
srv = http.server.ThreadingHTTPServer(("127.0.0.1", port), H)
def stop(*_):
    note("sglang-stopped"); os._exit(0)
signal.signal(signal.SIGTERM, stop)
srv.serve_forever()
"""

FAKE_PRODUCER = """\
#!{python}
import json, os, signal, sys, time, urllib.request
events = os.environ["EVENTS"]
def note(s):
    with open(events, "a") as f:
        f.write(s + "\\n")
note("producer-started " + json.dumps(sys.argv[1:]))
if os.environ.get("FAKE_PRODUCER_EXIT"):
    sys.exit(int(os.environ["FAKE_PRODUCER_EXIT"]))
port = int(os.environ["SGLANG_PORT"])
def drain(*_):
    time.sleep(0.3)  # "finishing the groups in flight": SGLang must still answer
    code = urllib.request.urlopen(f"http://127.0.0.1:{{port}}/health", timeout=5).status
    note(f"producer-drained health={{code}}"); note("producer-stopped"); sys.exit(0)
signal.signal(signal.SIGTERM, drain)
while True:
    time.sleep(0.05)
"""


def _stub(path: Path, body: str) -> str:
    path.write_text(body.format(python=sys.executable))
    path.chmod(0o755)
    return str(path)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _host_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GSPO_")}
    env.update(
        MODEL_PATH="/models/base",
        GSPO_RUN="exp1",
        GSPO_REDIS_URL="redis://:pw@redis:6379/0",
        SGLANG_PORT=str(_free_port()),
        METRICS_PORT="9400",
        PRODUCER_ID="h-0",
        EVENTS=str(tmp_path / "events"),
        SGLANG_PYTHON=_stub(tmp_path / "fake_sglang", FAKE_SGLANG),
        GSPO_PYTHON=_stub(tmp_path / "fake_producer", FAKE_PRODUCER),
        STOP_TIMEOUT_S="20",
        **extra,
    )
    return env


def _events(tmp_path: Path) -> list[str]:
    p = tmp_path / "events"
    return p.read_text().splitlines() if p.exists() else []


def _wait_for(tmp_path: Path, prefix: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not any(e.startswith(prefix) for e in _events(tmp_path)):
        assert time.monotonic() < deadline, f"no {prefix!r} event; got {_events(tmp_path)}"
        time.sleep(0.05)


def test_sglang_host_starts_producer_after_health_and_stops_it_first_on_sigterm(tmp_path):
    env = _host_env(tmp_path)
    proc = subprocess.Popen(
        ["bash", str(OPS / "sglang_host.sh")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_for(tmp_path, "producer-started")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    ev = _events(tmp_path)
    assert [e.split(" ")[0] for e in ev] == [
        "sglang-started",
        "producer-started",
        "producer-drained",
        "producer-stopped",
        "sglang-stopped",
    ], ev
    assert "health=200" in ev[2]  # SGLang still served while the producer drained
    sglang_args = json.loads(ev[0].split(" ", 1)[1])
    assert sglang_args[:2] == ["-m", "sglang.launch_server"]
    assert sglang_args[sglang_args.index("--model-path") + 1] == "/models/base"
    producer_args = json.loads(ev[1].split(" ", 1)[1])
    assert producer_args[:3] == ["-m", "gspo", "producer"]
    assert "pw" not in " ".join(producer_args)  # the Redis password stays in the environment
    assert producer_args[producer_args.index("--sglang-url") + 1] == f"http://127.0.0.1:{env['SGLANG_PORT']}"
    assert producer_args[producer_args.index("--model") + 1] == "/models/base"
    unknown = [a for a in producer_args if a.startswith("-") and a not in cli_flags("producer") and a != "-m"]
    assert not unknown


def test_sglang_host_stops_sglang_and_exits_with_the_producers_status(tmp_path):
    env = _host_env(tmp_path, FAKE_PRODUCER_EXIT="3")
    r = subprocess.run(
        ["bash", str(OPS / "sglang_host.sh")], env=env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 3, r.stderr
    assert [e.split(" ")[0] for e in _events(tmp_path)] == [
        "sglang-started",
        "producer-started",
        "sglang-stopped",
    ]


def test_sglang_host_refuses_to_run_without_a_redis_url(tmp_path):
    env = _host_env(tmp_path)
    del env["GSPO_REDIS_URL"]
    r = subprocess.run(
        ["bash", str(OPS / "sglang_host.sh")], env=env, capture_output=True, text=True, timeout=30
    )
    assert r.returncode != 0 and "GSPO_REDIS_URL" in r.stderr
    assert _events(tmp_path) == []


RECORD_ARGV = """\
#!{python}
import json, os, sys
with open(os.environ["EVENTS"], "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "run": os.environ.get("GSPO_RUN")}}) + "\\n")
"""

PARSE_TORCHRUN = """
import json, sys
from torch.distributed.run import get_args_parser
out = []
for argv in json.loads(sys.stdin.read()):
    a = get_args_parser().parse_args(argv)
    out.append({"module": a.module, "script": a.training_script, "args": a.training_script_args,
                "nnodes": a.nnodes, "nproc": a.nproc_per_node, "standalone": a.standalone,
                "rdzv_endpoint": a.rdzv_endpoint})
print(json.dumps(out))
"""


def _learner_launch_argv(tmp_path: Path, **extra: str) -> tuple[list[str], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GSPO_")}
    env.update(
        MODEL_PATH="/shared/base",
        RUN_DIR="/shared/exp1",
        GSPO_RUN="exp1",
        GSPO_REDIS_URL="redis://r:6379/0",
        GPUS="4",
        EVENTS=str(tmp_path / "events"),
        GSPO_PYTHON=_stub(tmp_path / "rec", RECORD_ARGV),
        **extra,
    )
    (tmp_path / "events").unlink(missing_ok=True)
    r = subprocess.run(
        ["bash", str(OPS / "learner_torchrun.sh")], env=env, capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "events").read_text())
    assert rec["argv"][:2] == ["-m", "torch.distributed.run"]
    return rec["argv"][2:], rec["run"]


def _torchrun_lines() -> list[list[str]]:
    """torchrun argv (after the program name) of the README lines and the learner StatefulSet."""
    out = []
    for ln in _readme_code_lines():
        if ln.lstrip().startswith("torchrun "):
            out.append(ln.split()[1:])
    c = _workload("learner-statefulset.yaml", "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    out.append([re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in c["args"]])
    return out


def test_learner_launch_lines_parse_with_torchruns_own_parser(tmp_path):
    single, run1 = _learner_launch_argv(tmp_path)
    multi, run2 = _learner_launch_argv(tmp_path, NNODES="2", RDZV_ENDPOINT="node0:29400")
    assert run1 == run2 == "exp1"  # the run id travels in the environment
    argvs = [single, multi, *_torchrun_lines()]
    r = subprocess.run(
        [sys.executable, "-c", PARSE_TORCHRUN],
        input=json.dumps(argvs),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    parsed = json.loads(r.stdout)
    assert len(parsed) == len(argvs) >= 5
    for p in parsed:
        assert p["module"] and p["script"] == "gspo" and p["args"][0] == "learner", p
        assert not set(FLAG_RE.findall(" ".join(p["args"][1:]))) - cli_flags("learner"), p
    assert parsed[0]["standalone"] and parsed[0]["nproc"] == "4" and parsed[0]["nnodes"] == "1"
    assert parsed[1]["nnodes"] == "2" and parsed[1]["rdzv_endpoint"] == "node0:29400"


def test_torchrun_refuses_a_run_flag_after_the_module():
    """Why the recipes pass the run id as GSPO_RUN: torchrun takes `--run` for its own `--run-path`."""
    code = "from torch.distributed.run import get_args_parser; get_args_parser().parse_args(['-m', 'gspo', 'learner', '--run', 'x'])"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    if r.returncode == 0:
        pytest.fail("torchrun now accepts --run after the module: the GSPO_RUN workaround can go")
    assert "ambiguous option: --run" in r.stderr


# ---------------------------------------------------------------- the README's Redis ACL line
def _acl_line(run: str, user: str, password: str) -> list[str]:
    (line,) = re.findall(r"^ACL SETUSER .*$", README.read_text(), flags=re.M)
    line = (
        line.replace("gspo-exp1", user)
        .replace("gspo:exp1:", f"gspo:{run}:")
        .replace(">PASSWORD", f">{password}")
    )
    return line.split()[2:]


@pytest.mark.redis
async def test_readme_acl_user_can_run_the_pipeline_and_nothing_else(redis_url, aredis, run_id):
    import redis as redis_lib

    from common.admission import Admitter
    from common.config import RedisSettings
    from common.keys import RunKeys
    from common.redis_conn import connect_async
    from common.streams import StreamClient

    user = f"u-{run_id}"
    await aredis.execute_command("ACL", "SETUSER", *_acl_line(run_id, user, "s3cret-pw"))
    host = redis_url.split("://", 1)[1]
    client = connect_async(RedisSettings(url=f"redis://{user}:s3cret-pw@{host}"))
    try:
        keys, streams = RunKeys(run_id), StreamClient(client)
        await streams.ensure_group(keys.rollouts, "learner")
        await streams.append(keys.rollouts, b"group", maxlen=1000)
        (entry,) = await streams.read(keys.rollouts, "learner", "learner-0", 10, None)
        assert await streams.pending_count(keys.rollouts, "learner") == 1
        claimed, _, _ = await streams.autoclaim(keys.rollouts, "learner", "learner-1", 0)
        assert [e.id for e in claimed] == [entry.id]
        await streams.dead_letter(
            keys.dead, keys.rollouts, "learner", entry, "test", "acl", "learner-1", 1000
        )
        assert await streams.backlog(keys.rollouts, "learner") == 0
        await client.hset(keys.learner_state, mapping={"version": 0, "consumed": 0})
        await client.set(keys.producer("p1"), b"hb", ex=10)
        assert [k async for k in client.scan_iter(match=f"{keys.producers}:*")] == [
            keys.producer("p1").encode()
        ]
        assert (await Admitter(client, keys, 1, 4, 8).try_admit("g1", 0)).admitted
        for refused in (client.set(f"gspo:other-{run_id}:x", 1), client.keys("*"), client.flushall()):
            with pytest.raises(redis_lib.exceptions.NoPermissionError):
                await refused
    finally:
        await client.aclose()
        await aredis.execute_command("ACL", "DELUSER", user)


def test_readme_names_only_files_that_exist():
    for rel in re.findall(
        r"`((?:ops/)?(?:k8s|systemd|grafana)/[\w@.-]+|ops/[\w.-]+\.(?:sh|yml))`", README.read_text()
    ):
        assert (REPO / rel if rel.startswith("ops/") else OPS / rel).exists(), rel
