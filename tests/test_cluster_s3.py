"""Cluster-native runs: a run directory in object storage, on a cluster whose nodes share no filesystem.

The cluster is `LoopbackCluster` (tests/loopback_cluster.py): a head and a worker node on loopback,
token auth, jobs through the real `ray job submit`; the worker node's processes run in their own mount
namespace where /tmp, /var/tmp and the repository's runs/ are empty tmpfs mounts (test (a) proves a
Ray task there cannot read what the driver side writes). Object storage is the session's moto S3
server (`s3_server`), whose AWS_* variables both nodes get.

(a) no shared filesystem: files the test and the job driver write are invisible to a task on the worker.
(b) `jobs/pipeline.py` with run_dir=s3://...: every artifact lands in the bucket, the work ran on both
    nodes, nothing is written locally, and the numbers equal a run with a local run_dir.
(c) the worker node's raylet SIGKILLed during epoch 2: after a new worker node joins, training resumes
    from the last checkpoint in S3 and ends with the weights of an undisturbed run.
(d) bad run_dir URIs through the CLI: exit status 2, one line naming the URI and a fix, nothing left behind.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import SRD_PIPELINE  # noqa: E402
from loopback_cluster import BIN, REPO, LoopbackCluster, _alive, kill_processes  # noqa: E402

pytestmark = [pytest.mark.multinode, pytest.mark.slow, pytest.mark.timeout(900),
              pytest.mark.skipif(not sys.platform.startswith("linux") or os.geteuid() != 0,
                                 reason="mount namespaces (unshare + tmpfs) need root on Linux")]

RAYROBUST = str(BIN / "rayrobust")
# Fields of a summary row / checkpoint history that are wall-clock measurements, not results.
WALL_CLOCK = {"seconds", "images_per_s", "epoch_seconds", "wall_seconds"}

# The SRD pipeline of tests/test_srd.py (methods [srd], its source model trained first): the reference run with
# a local run_dir is that module's, shared through conftest's session fixture `srd_pipeline`.
PIPELINE = {**SRD_PIPELINE, "name": "cluster-s3", "run_dir": "runs/cluster-s3"}
# PGD-AT with small batches: an epoch lasts seconds, so a kill lands inside epoch 2 (tests/test_faults.py).
FAULT = {
    "name": "cluster-s3-fault", "run_dir": "runs/cluster-s3-fault", "methods": ["pgd_at"],
    "data": {"name": "digits", "val_size": 100},
    "model": {"name": "small_cnn"},
    "train": {"method": "pgd_at", "epochs": 3, "batch_size": 32, "lr": 0.1, "eps": 0.1, "attack_steps": 4,
              "num_workers": 2, "cpus_per_worker": 1, "val_pgd_steps": 2, "max_failures": 3},
}


def _process_alive(pid: int, wait: float = 5.0) -> bool:
    """Whether `pid` still runs `wait` seconds after a SIGKILL was sent to it (a zombie counts as gone)."""
    deadline = time.time() + wait
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.05)
    return _alive(pid)


def _write_config(path: Path, raw: dict) -> Path:
    path.write_text(json.dumps(raw, indent=1))  # JSON is YAML
    return path


@pytest.fixture(scope="module")
def cluster(s3_server):
    """Head (1 CPU) + isolated worker (1 CPU): the same 2 CPUs as the local Ray of the reference runs, and
    Ray Train's PACK placement cannot put both ranks on one node, so training always spans both."""
    c = LoopbackCluster(s3_server.env, head_cpus=1, worker_cpus=1)
    try:
        c.start()
        yield c
    finally:
        c.stop()


def _runs_entries() -> set:
    runs = REPO / "runs"
    return set(os.listdir(runs)) if runs.is_dir() else set()


def _repo_uri_folders() -> list:
    """Folders a URI mistaken for a relative path would create at the repository's top level."""
    return [e for e in os.listdir(REPO) if e.endswith(":")]


def _cli_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update({"RAYROBUST_DASHBOARD": "0", "OMP_NUM_THREADS": "1", "AWS_EC2_METADATA_DISABLED": "true"})
    env.update(extra)
    return {k: v for k, v in env.items() if v is not None}


# --- (a) ----------------------------------------------------------------------------------------------
PROBE = """\
import json, os, sys
import ray

ray.init()
paths = sys.argv[1:]
with open("written-by-the-job-driver.txt", "w") as f:  # the job's working directory, on the head
    f.write("driver")
paths.append(os.path.abspath("written-by-the-job-driver.txt"))

@ray.remote(num_cpus=0)
def look(ps):
    return {"node": ray.get_runtime_context().get_node_id(), "seen": {p: os.path.exists(p) for p in ps}}

out = {"worker": ray.get(look.options(resources={"worker": 0.01}).remote(paths)),
       "head": ray.get(look.options(resources={"head": 0.01}).remote(paths))}
print("PROBE " + json.dumps(out))
"""


def test_a_the_worker_node_cannot_see_files_the_driver_side_writes(cluster, tmp_path):
    assert cluster.hidden_dirs[:2] == ["/tmp", "/var/tmp"]
    assert any(str(REPO / "runs") == h or str(REPO / "runs").startswith(h + "/") for h in cluster.hidden_dirs)
    secret = tmp_path / "written-by-the-test.txt"
    secret.write_text("test")
    had_runs = (REPO / "runs").exists()
    run_secret = REPO / "runs" / f"probe-{uuid.uuid4().hex[:8]}" / "written-by-the-test.txt"
    run_secret.parent.mkdir(parents=True)
    run_secret.write_text("test")
    in_base = cluster.base / "written-by-the-test.txt"  # the head's temp dir and HOME live here
    in_base.write_text("test")
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    visible = REPO / "jobs" / "pipeline.py"  # the repository's code stays visible (it ran there at start)
    try:
        code, out = cluster.submit(["python", str(probe), str(secret), str(run_secret), str(in_base), str(visible)])
    finally:
        run_secret.unlink()
        run_secret.parent.rmdir()
        if not had_runs:
            (REPO / "runs").rmdir()
    assert code == 0, f"{out[-4000:]}\n{cluster.logs()}"
    res = json.loads(next(line for line in out.splitlines() if line.startswith("PROBE "))[len("PROBE "):])
    assert res["worker"]["node"] == cluster.worker_node_id and res["head"]["node"] == cluster.head_node_id
    hidden = [str(secret), str(run_secret), str(in_base)]
    job_file = next(p for p in res["head"]["seen"] if p.endswith("written-by-the-job-driver.txt"))
    for p in hidden + [job_file]:
        assert res["head"]["seen"][p] is True, p  # the head node sees it (the probe works) ...
        assert res["worker"]["seen"][p] is False, p  # ... the worker node does not
    assert res["worker"]["seen"][str(visible)] is True
    print(f"hidden from the worker node: {cluster.hidden_dirs} and repository entries created after it started")

    # Nobody without the cluster's token gets in: no token at all, then a wrong one.
    anon = {**{k: v for k, v in cluster.env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")},
            "HOME": str(tmp_path / "nobody")}
    refused = cluster.ray("job", "submit", "--address", cluster.address, "--", "echo", "pwned", env=anon, timeout=120)
    assert refused.returncode != 0 and "Missing authentication token" in refused.stdout + refused.stderr
    wrong = cluster.ray("job", "submit", "--address", cluster.address, "--", "echo", "pwned",
                        env={**cluster.env, "RAY_AUTH_TOKEN": "not-the-token"}, timeout=120)
    assert wrong.returncode != 0 and "Invalid authentication token" in wrong.stdout + wrong.stderr


# --- (b) ----------------------------------------------------------------------------------------------
def _strip(rows):
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in rows]


def _bucket_files(s3_server, bucket: str, prefix: str) -> set:
    return {k[len(prefix) + 1:] for k in s3_server.keys(bucket, prefix + "/")}


def _read_s3_json(s3_server, bucket: str, key: str):
    try:
        return json.loads(s3_server.client().get_object(Bucket=bucket, Key=key)["Body"].read())
    except Exception:  # noqa: BLE001 - not there yet
        return None


@pytest.mark.timeout(1800)
def test_b_pipeline_job_with_an_s3_run_dir_writes_everything_to_the_bucket(cluster, s3_server, tmp_path, request):
    from rayrobust.checkpoint import load_checkpoint

    bucket = f"rr-pipeline-{uuid.uuid4().hex[:6]}"
    s3_server.make_bucket(bucket)
    run_uri = f"s3://{bucket}/runs/demo"
    config = _write_config(tmp_path / "pipeline.json", PIPELINE)
    runs_before = _runs_entries()

    t0 = time.time()
    sid = f"rr-s3-{uuid.uuid4().hex[:6]}"
    code, out = cluster.submit(["python", "jobs/pipeline.py", "--config", str(config), "--set", f"run_dir={run_uri}"],
                               submission_id=sid, timeout=1200)
    s3_seconds = time.time() - t0
    assert cluster.job_status(sid) == "SUCCEEDED" and code == 0, f"{out[-6000:]}\n{cluster.logs()}"

    # The same config with a local run_dir, on the local 2-CPU Ray (the cluster's local paths are not shared).
    t0 = time.time()
    local_cfg, _ = request.getfixturevalue("srd_pipeline")  # runs it here unless tests/test_srd.py did
    local = Path(local_cfg.run_dir)
    local_seconds = time.time() - t0

    # Every artifact is in the bucket; each file the local run wrote has its object.
    got = _bucket_files(s3_server, bucket, "runs/demo")
    for method in ("standard", "srd"):  # standard is srd's source: trained, not evaluated
        for rel in ("checkpoints/epoch_001/checkpoint.pt", "checkpoints/epoch_001/checkpoint.pt.sha256",
                    "train.json", "metrics.jsonl") + (("eval.json",) if method == "srd" else ()):
            assert f"{method}/{rel}" in got, (f"{method}/{rel}", sorted(got))
    assert "summary.json" in got
    for stage in ("latents", "clusters", "dictionaries"):
        assert any(k.startswith(f"semantic/{stage}/") for k in got), (stage, sorted(got))
    assert "semantic/latents/manifest.json" in got and any(k.endswith(".parquet") for k in got)
    # Ray Data names the latent files it writes by its own run id: those are compared through the manifests.
    # Saved attack chunks are named by a hash of the attacked weights: compared by kind and count.
    def named(files):
        return {f for f in files if not (f.startswith("semantic/latents/") and f.endswith(".parquet"))
                and "/attack_chunks/" not in f}

    def chunk_files(files):
        return sorted(f.split("/attack_chunks/")[0] + "/" + f.split("/attack_chunks/")[1].split("-")[0] + "/"
                      + f.rsplit("/", 1)[1] for f in files if "/attack_chunks/" in f)

    local_files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    missing = sorted(f for f in named(local_files) if f not in got and not f.split("/")[-1].startswith("."))
    assert not missing, missing
    # Every finished AutoAttack, BPDA and non-adaptive chunk was saved to the bucket as it finished.
    assert chunk_files(got) == chunk_files(local_files)
    assert {c.split("/")[1] for c in chunk_files(got)} == {"autoattack", "bpda", "transfer"}, chunk_files(got)
    shards = _read_s3_json(s3_server, bucket, "runs/demo/semantic/latents/manifest.json")["shards"]
    assert {f"semantic/latents/{sh['file']}" for sh in shards} == \
        {f for f in got if f.startswith("semantic/latents/") and f.endswith(".parquet")}
    local_shards = json.loads((local / "semantic" / "latents" / "manifest.json").read_text())["shards"]
    assert sum(sh["rows"] for sh in shards) == sum(sh["rows"] for sh in local_shards)

    # Nothing was written to a local run directory: not in the repo, not in the job's working dir on the head.
    assert _runs_entries() <= runs_before and not _repo_uri_folders()
    for wd in cluster.base.glob("head/session_*/runtime_resources/working_dir_files/*"):
        assert not (wd / "runs").exists() and not [e for e in os.listdir(wd) if e.endswith(":")], sorted(os.listdir(wd))

    # The work ran on both nodes, as the artifacts record.
    both = {cluster.head_node_id, cluster.worker_node_id}
    nodes = {}
    for method in ("standard", "srd"):
        ckpt = load_checkpoint(f"{run_uri}/{method}/checkpoints/epoch_001")
        nodes[f"{method} training"] = set(ckpt["provenance"]["worker_nodes"])
        assert set(ckpt["provenance"]["worker_nodes"]) == both, (method, ckpt["provenance"]["worker_nodes"], both)
    nodes["srd AutoAttack"] = set(_read_s3_json(s3_server, bucket, "runs/demo/srd/eval.json")["autoattack"]["nodes"])
    latents = _read_s3_json(s3_server, bucket, "runs/demo/semantic/latents/manifest.json")
    nodes["latents"] = set(latents["nodes"])
    assert set().union(*nodes.values()) == both, nodes

    # The numbers equal the local run's (same seed, same 2 Ray Train ranks, same shards).
    summary = _read_s3_json(s3_server, bucket, "runs/demo/summary.json")
    local_summary = json.loads((local / "summary.json").read_text())
    assert _strip(summary["rows"]) == _strip(local_summary["rows"]), (summary["rows"], local_summary["rows"])
    for method in ("standard", "srd"):
        a = load_checkpoint(f"{run_uri}/{method}/checkpoints/epoch_001")["model"]
        b = load_checkpoint(local / method / "checkpoints" / "epoch_001")["model"]
        for k, v in b.items():
            assert torch.allclose(a[k].float(), v.float(), rtol=0, atol=1e-6), (method, k)
    print(f"pipeline: s3 run_dir on the 2-node cluster {s3_seconds:.0f}s, local run_dir on local Ray "
          f"{local_seconds:.0f}s; nodes per artifact: { {k: len(v) for k, v in nodes.items()} }")


# --- (d) ----------------------------------------------------------------------------------------------
class AuthS3Server:
    """A second moto server that checks credentials (moto's IAM auth: after the first few requests, only
    the access key of an IAM user made by those requests is accepted, with its secret)."""

    def __init__(self, tmp: Path):
        import boto3

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{port}"
        env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "4"}
        self.proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while True:  # a raw socket connect (an HTTP request would use up one unauthenticated action)
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"moto_server did not start on {self.endpoint}")
                time.sleep(0.2)
        boot = dict(endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id="boot",
                    aws_secret_access_key="boot")
        iam = boto3.client("iam", **boot)
        iam.create_user(UserName="rr")
        iam.put_user_policy(UserName="rr", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="rr")["AccessKey"]
        self.key, self.secret = key["AccessKeyId"], key["SecretAccessKey"]
        self.s3 = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                               aws_access_key_id=self.key, aws_secret_access_key=self.secret)
        self.s3.create_bucket(Bucket="rr-auth")

    def keys(self, bucket: str) -> list:
        return [o["Key"] for o in self.s3.list_objects_v2(Bucket=bucket).get("Contents", [])]

    def stop(self) -> None:
        kill_processes({self.proc.pid}, grace=2)
        self.proc.wait(timeout=10)


def _bad_uri(command: str, uri: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    tiny = ["--set", "data.name=digits", "--set", "model.name=small_cnn", "--set", "methods=[standard]",
            "--set", "train.epochs=1", "--set", "eval.n_eval=20", "--set", "eval.n_autoattack=10"]
    return subprocess.run([RAYROBUST, command, *tiny, "--set", f"run_dir={uri}"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=180)


def _assert_one_line_error(r: subprocess.CompletedProcess, uri: str) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    assert len(lines) == 1, r.stderr
    line = lines[0]
    assert line.startswith("rayrobust: error: ") and uri in line, line
    assert any(w in line for w in ("check", "use ", "write ", "create", "set ")), f"no fix named: {line}"
    return line


@pytest.mark.parametrize("command", ["pipeline", "train"])
def test_d_unknown_scheme_is_one_line_exit_2_and_nothing_written(command, tmp_path):
    uri = "foo://bucket/run"
    r = _bad_uri(command, uri, tmp_path, _cli_env())
    line = _assert_one_line_error(r, uri)
    assert "s3://" in line  # the fix: the schemes that work
    assert list(tmp_path.iterdir()) == [] and not _repo_uri_folders()


@pytest.mark.parametrize("command", ["pipeline", "train"])
def test_d_missing_bucket_is_one_line_exit_2_and_nothing_written(command, s3_server, tmp_path):
    bucket = f"rr-missing-{uuid.uuid4().hex[:6]}"
    uri = f"s3://{bucket}/runs/x"
    buckets = {b["Name"] for b in s3_server.client().list_buckets()["Buckets"]}
    r = _bad_uri(command, uri, tmp_path, _cli_env(**s3_server.env))
    _assert_one_line_error(r, uri)
    assert {b["Name"] for b in s3_server.client().list_buckets()["Buckets"]} == buckets  # no bucket made
    assert list(tmp_path.iterdir()) == [] and not _repo_uri_folders()


@pytest.fixture(scope="module")
def auth_s3(tmp_path_factory):
    server = AuthS3Server(tmp_path_factory.mktemp("auth-s3"))
    yield server
    server.stop()


@pytest.mark.parametrize("case", ["no-access-key", "wrong-secret"])
@pytest.mark.parametrize("command", ["pipeline", "train"])
def test_d_bad_credentials_are_one_line_exit_2_and_nothing_written(command, case, auth_s3, tmp_path):
    uri = "s3://rr-auth/runs/x"
    creds = {"AWS_ENDPOINT_URL": auth_s3.endpoint, "AWS_REGION": "us-east-1",
             "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path.parent / "none"), "AWS_CONFIG_FILE": str(tmp_path.parent / "none")}
    if case == "no-access-key":
        creds.update(AWS_ACCESS_KEY_ID=None, AWS_SECRET_ACCESS_KEY=None, AWS_SESSION_TOKEN=None)
    else:
        creds.update(AWS_ACCESS_KEY_ID=auth_s3.key, AWS_SECRET_ACCESS_KEY="not-" + auth_s3.secret)
    r = _bad_uri(command, uri, tmp_path, _cli_env(**creds))
    _assert_one_line_error(r, uri)
    assert auth_s3.keys("rr-auth") == [] and list(tmp_path.iterdir()) == [] and not _repo_uri_folders()


def test_d_the_auth_server_accepts_the_right_credentials(auth_s3):
    """The control for the credential cases: with its key and secret the bucket is writable."""
    code = subprocess.run([sys.executable, "-c", "import sys; from rayrobust.location import check_writable; "
                           "check_writable(sys.argv[1])", "s3://rr-auth/runs/x"],
                          env=_cli_env(AWS_ENDPOINT_URL=auth_s3.endpoint, AWS_ACCESS_KEY_ID=auth_s3.key,
                                       AWS_SECRET_ACCESS_KEY=auth_s3.secret, AWS_REGION="us-east-1"),
                          capture_output=True, text=True, timeout=120)
    assert code.returncode == 0, code.stderr[-2000:]
    assert not [k for k in auth_s3.keys("rr-auth") if "probe" in k]  # the probe object is removed


# --- (c) ----------------------------------------------------------------------------------------------
@pytest.mark.timeout(1800)
def test_c_worker_node_killed_in_epoch_2_resumes_from_s3_and_matches_an_undisturbed_run(cluster, s3_server, tmp_path):
    from rayrobust.checkpoint import load_checkpoint

    bucket = f"rr-fault-{uuid.uuid4().hex[:6]}"
    s3_server.make_bucket(bucket)
    config = _write_config(tmp_path / "fault.json", FAULT)
    prefix = "runs/killed"
    uri = f"s3://{bucket}/{prefix}"
    ckpt1 = f"{prefix}/pgd_at/checkpoints/epoch_001/checkpoint.pt"

    def in_epoch_2():
        keys = set(s3_server.keys(bucket, prefix + "/"))
        if ckpt1 not in keys:
            return None
        recs = [_read_s3_json(s3_server, bucket, f"{prefix}/pgd_at/workers/rank{r}.json") for r in (0, 1)]
        return recs if all(r and r["epoch"] == 2 for r in recs) else None

    job = cluster.submit_async(["python", "jobs/train.py", "--config", str(config), "--set", f"run_dir={uri}"],
                               submission_id="rr-fault")
    output = []
    reader = threading.Thread(target=lambda: output.append(job.stdout.read()), daemon=True)
    reader.start()
    seen, deadline = None, time.time() + 400
    while seen is None and time.time() < deadline and job.poll() is None:
        seen = in_epoch_2()
        time.sleep(0.05)
    assert seen, f"training never reached epoch 2:\n{''.join(output)[-4000:]}\n{cluster.logs()}"
    before = sorted(k for k in s3_server.keys(bucket, prefix + "/pgd_at/checkpoints/") if k.endswith(".pt"))
    old_worker = cluster.worker_node_id
    killed = cluster.kill_worker_raylet()
    # the rank that trained on the lost node went with it (a surviving orphan would finish the run undisturbed)
    lost = [r for r in seen if r["node_id"] == old_worker]
    assert lost and not any(_process_alive(r["pid"]) for r in lost), seen
    new_worker = cluster.restart_worker()
    try:
        job.wait(timeout=600)
    finally:
        if job.poll() is None:
            job.kill()
    reader.join(timeout=10)
    out = "".join(output)
    assert before == [ckpt1], before  # the kill landed in epoch 2
    assert cluster.job_status("rr-fault") == "SUCCEEDED" and job.returncode == 0, f"{out[-6000:]}\n{cluster.logs()}"
    assert new_worker != old_worker and old_worker not in cluster.alive_node_ids()

    # Resumed from the newest checkpoint in S3 on the new worker group, not from scratch: epoch 1's, or
    # epoch 2's when the kill came after epoch 2's last all-reduce and rank 0 (on the head) still uploaded it.
    recs = [_read_s3_json(s3_server, bucket, f"{prefix}/pgd_at/workers/rank{r}.json") for r in (0, 1)]
    brief = [{k: r[k] for k in ("rank", "epoch", "start_epoch")} for r in recs]
    starts = {r["start_epoch"] for r in recs}
    assert len(starts) == 1 and starts <= {1, 2} and all(r["epoch"] == 3 for r in recs), brief
    assert {r["node_id"] for r in recs} == {cluster.head_node_id, new_worker}, recs
    ckpts = sorted(k for k in s3_server.keys(bucket, prefix + "/pgd_at/checkpoints/") if k.endswith("checkpoint.pt"))
    assert ckpts == [f"{prefix}/pgd_at/checkpoints/epoch_00{e}/checkpoint.pt" for e in (1, 2, 3)], ckpts

    # The final weights equal an undisturbed run's (same seed, same 2 ranks), on the same (recovered) cluster.
    ref_uri = f"s3://{bucket}/runs/undisturbed"
    code, ref_out = cluster.submit(["python", "jobs/train.py", "--config", str(config), "--set", f"run_dir={ref_uri}"],
                                   submission_id="rr-fault-ref")
    assert code == 0 and cluster.job_status("rr-fault-ref") == "SUCCEEDED", ref_out[-4000:]
    got = load_checkpoint(f"{uri}/pgd_at/checkpoints/epoch_003")
    want = load_checkpoint(f"{ref_uri}/pgd_at/checkpoints/epoch_003")
    assert got["epoch"] == want["epoch"] == 3
    for k, v in want["model"].items():
        assert torch.allclose(got["model"][k].float(), v.float(), rtol=0, atol=1e-6), k
    strip = lambda h: [{k: v for k, v in m.items() if k not in WALL_CLOCK} for m in h]  # noqa: E731
    assert strip(got["history"]) == strip(want["history"])
    print(f"raylet {killed} of node {old_worker[:8]} killed in epoch 2; resumed from epoch {starts.pop()} "
          f"on {new_worker[:8]}")
