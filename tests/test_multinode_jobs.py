"""A two-node Ray cluster on loopback, with token authentication, driven by the real `ray` CLI.

The head (1 CPU, resource `head`) and a worker node (2 CPUs, resource `worker`) are `ray start --block`
processes with a private temp dir, HOME (so a private ~/.ray/auth_token) and ports; the test process
never connects to them (the session `ray_cluster` is untouched). Teardown kills exactly the processes
these two commands started, never `ray stop` (which would stop every Ray on the machine).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from rayrobust.checkpoint import load_checkpoint

from loopback_cluster import descendants, free_ports, kill_processes

pytestmark = [pytest.mark.multinode, pytest.mark.slow, pytest.mark.timeout(300),
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to clean up")]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's `ray` and `python`
RAY = str(BIN / "ray")

TINY = """\
name: multinode
run_dir: runs/multinode          # relative: under the cluster's storage root (RAYROBUST_STORAGE_PATH)
methods: [standard]
data: {name: digits, val_size: 100}
model: {name: small_cnn}
train: {method: standard, epochs: 1, batch_size: 64, lr: 0.05, eps: 0.1, num_workers: 2, cpus_per_worker: 1,
        val_pgd_steps: 2}
eval: {eps: 0.1, n_eval: 60, n_autoattack: 20, pgd_steps: 5, batch_size: 60, num_shards: 2, chunk_size: 10,
       checks: false}
"""


def _kill_tree(procs, marker: str) -> None:
    """SIGTERM, then SIGKILL after a grace period, exactly the processes our two `ray start` commands started."""
    roots = [p.pid for p in procs]
    kill_processes(descendants(roots, [marker]), roots=roots, markers=[marker])  # collected first: orphans lose their parent
    for p in procs:
        p.wait(timeout=10)


class Cluster:
    def __init__(self, base: Path):
        self.base = base
        self.home = base / "home"
        self.home.mkdir()
        self.storage = base / "storage"
        (self.gcs, self.dash, *self.ports) = free_ports(16)
        self.env = {k: v for k, v in os.environ.items()
                    if not (k in ("RAY_ADDRESS", "RAYROBUST_STORAGE_PATH") or k.startswith(("RAY_AUTH", "RAY_JOB")))}
        self.env.update({"HOME": str(self.home), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                         "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1",
                         # what cluster.yaml exports on every node: the root of relative run directories
                         "RAYROBUST_STORAGE_PATH": self.storage.as_uri()})
        self.procs: list = []
        self.address = f"http://127.0.0.1:{self.dash}"

    def start_node(self, *args: str, name: str) -> None:
        p = self.ports
        agent = [f"--dashboard-agent-listen-port={p.pop()}", f"--dashboard-agent-grpc-port={p.pop()}",
                 f"--runtime-env-agent-port={p.pop()}", f"--metrics-export-port={p.pop()}",
                 f"--node-manager-port={p.pop()}"]
        log = open(self.base / f"{name}.log", "w")
        self.procs.append(subprocess.Popen(
            [RAY, "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats", *agent, *args],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.base))

    def token(self) -> str:
        return (self.home / ".ray" / "auth_token").read_text().strip()

    def get(self, path: str, token: str | None = None):
        req = urllib.request.Request(self.address + path, headers={"Authorization": f"Bearer {token}"} if token else {})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def wait_for_nodes(self, n: int, timeout: float = 120) -> list:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for p in self.procs:
                assert p.poll() is None, f"a ray node exited: {self.logs()}"
            try:
                data = self.get("/api/v0/nodes?detail=true", self.token())
                alive = [nd["node_id"] for nd in data["data"]["result"]["result"] if nd["state"] == "ALIVE"]
                if len(alive) >= n:
                    return alive
            except (OSError, KeyError, ValueError):
                pass
            time.sleep(1)
        raise AssertionError(f"{n} nodes did not come up in {timeout}s: {self.logs()}")

    def ray(self, *args: str, env=None, timeout: float = 240) -> subprocess.CompletedProcess:
        return subprocess.run([RAY, *args], env=env or self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.base.glob("*.log")))


@pytest.fixture
def cluster():
    base = Path(tempfile.mkdtemp(prefix="rrmn", dir="/tmp"))  # short: Ray's unix socket paths have a length limit
    c = Cluster(base)
    try:
        yield c
    finally:
        _kill_tree(c.procs, str(base))
        shutil.rmtree(base, ignore_errors=True)


def test_pipeline_job_spreads_over_two_nodes_keeps_results_in_storage_and_needs_the_token(cluster):
    c = cluster
    gen = c.ray("get-auth-token", "--generate", timeout=60)  # the documented first step: ~/.ray/auth_token
    assert gen.returncode == 0, gen.stderr
    assert (c.home / ".ray" / "auth_token").exists() and len(c.token()) >= 16
    c.start_node("--head", f"--port={c.gcs}", "--num-cpus=1", '--resources={"head": 1}',
                 f"--temp-dir={c.base / 'ray'}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                 f"--dashboard-port={c.dash}", f"--ray-client-server-port={c.ports.pop()}", name="head")
    c.wait_for_nodes(1)
    # Its own temp dir, as a separate machine has: nodes sharing one would share (and replace) each
    # other's unpacked job working directories.
    c.start_node(f"--address=127.0.0.1:{c.gcs}", "--num-cpus=2", '--resources={"worker": 1}',
                 f"--temp-dir={c.base / 'ray-w'}", name="worker")
    nodes = c.wait_for_nodes(2)

    # Nobody without the token gets in: no token at all, then a wrong one.
    anon = {**{k: v for k, v in c.env.items() if k != "RAY_AUTH_MODE"}, "HOME": str(c.base / "nobody")}
    refused = c.ray("job", "submit", "--address", c.address, "--", "echo", "pwned", env=anon, timeout=120)
    assert refused.returncode != 0 and "Missing authentication token" in refused.stdout + refused.stderr
    wrong = c.ray("job", "submit", "--address", c.address, "--", "echo", "pwned",
                  env={**c.env, "RAY_AUTH_TOKEN": "not-the-token"}, timeout=120)
    assert wrong.returncode != 0 and "Invalid authentication token" in wrong.stdout + wrong.stderr
    with pytest.raises(urllib.error.HTTPError, match="401"):
        c.get("/api/jobs/")

    config = c.base / "tiny.yaml"
    config.write_text(TINY)
    t0 = time.time()
    job = c.ray("job", "submit", "--address", c.address, "--submission-id", "rr-multinode", "--working-dir", ".",
                "--", "python", "jobs/pipeline.py", "--config", str(config))
    took = time.time() - t0
    status = c.get("/api/jobs/rr-multinode", c.token())["status"]
    assert status == "SUCCEEDED" and job.returncode == 0, f"{job.stdout[-4000:]}\n{job.stderr[-2000:]}\n{c.logs()}"
    jobs = c.get("/api/jobs/", c.token())
    assert [j["submission_id"] for j in jobs if j.get("submission_id")] == ["rr-multinode"]  # the refused ones never ran

    # Every artifact is under the storage root, at the relative run directory; none in the job's working dir.
    stored = c.storage / "runs" / "multinode"
    for rel in ("summary.json", "standard/eval.json", "standard/train.json", "standard/metrics.jsonl",
                "standard/checkpoints/epoch_001/checkpoint.pt", "standard/checkpoints/epoch_001/checkpoint.pt.sha256",
                "standard/workers/rank0.json", "standard/workers/rank1.json"):
        assert (stored / rel).is_file(), rel
    assert not list((c.base / "ray").rglob("runs/multinode"))  # nothing in the head's copy of the working dir
    summary = json.loads((stored / "summary.json").read_text())
    assert [r["method"] for r in summary["rows"]] == ["standard"]
    assert summary["rows"][0]["clean_acc"] > 0.25  # one short epoch: well above chance (0.1), not converged

    # The work ran on both nodes: training ranks and AutoAttack shards record their node ids.
    ckpt = load_checkpoint(stored / "standard" / "checkpoints" / "epoch_001")
    train_nodes = ckpt["provenance"]["worker_nodes"]
    aa = json.loads((stored / "standard" / "eval.json").read_text())["autoattack"]
    assert len(train_nodes) == 2 and sum(aa["nodes"].values()) == 20
    used = set(train_nodes) | set(aa["nodes"])
    assert used == set(nodes), (train_nodes, aa["nodes"], nodes)
    assert len(set(aa["nodes"])) == 2  # AutoAttack actors are spread over the nodes
    print(f"pipeline job: {took:.0f}s; train ranks on {train_nodes}; AutoAttack examples per node {aa['nodes']}")
