"""A two-node Ray cluster on loopback whose nodes share no filesystem with the driver side.

`LoopbackCluster` starts, with the real `ray start --block` CLI and token authentication:

* a head node (`head_cpus` CPUs, custom resource `head`), where `ray job submit` runs job drivers;
* a worker node (`worker_cpus` CPUs, custom resource `worker`) whose whole process tree (raylet,
  runtime-env agent, every Ray worker process) lives in its own mount namespace
  (`unshare --mount --propagation private`, needs root on Linux). In that namespace empty tmpfs
  mounts cover the directories the driver side writes to (`hidden_dirs`): /tmp (pytest's tmp_path,
  the head's session directory with the jobs' unpacked working directories, the cluster's HOME),
  /var/tmp and the repository's `runs/`. The repository itself is replaced by a tmpfs holding
  bind mounts of its top-level entries as they were when the node started (the venv, the package,
  jobs/, configs/ ...), without `runs/`: a directory or file created at the repository's top level
  later (a stray `runs/`, an `s3:` folder) is not visible there either. The worker node's own Ray
  temp dir is the only path under /tmp it shares with the test (its logs stay readable).

So a job that works on this cluster cannot rely on a file the driver (or the test) wrote: whatever
crosses between the nodes goes through Ray itself or through object storage.

Both nodes get the same environment (plus `env`, e.g. the S3 server's AWS_* variables). Each node
has a private HOME, temp dir and ports. `stop()` kills exactly the processes these `ray start`
commands started (never `ray stop`, which would stop every Ray on the machine).
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's `ray` and `python`
RAY = str(BIN / "ray")
STAGING = "/mnt"  # an existing directory the worker's mount namespace covers with a tmpfs to stage bind mounts


def free_ports(n: int) -> List[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def proc_table() -> Dict[int, Tuple[int, str]]:
    """pid -> (ppid, cmdline) from /proc."""
    table = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        table[int(d)] = (int(stat.rsplit(")", 1)[1].split()[1]), cmd)
    return table


def descendants(roots: Iterable[int], markers: Iterable[str] = ()) -> set:
    """`roots` (those alive), every process whose command line contains one of `markers`, and all their descendants."""
    table = proc_table()
    markers = [m for m in markers if m]
    found = {r for r in roots if r in table} | {pid for pid, (_, cmd) in table.items() if any(m in cmd for m in markers)}
    grew = True
    while grew:
        kids = {pid for pid, (ppid, _) in table.items() if ppid in found} - found
        found |= kids
        grew = bool(kids)
    found.discard(os.getpid())
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_processes(pids: set, roots: Iterable[int] = (), markers: Iterable[str] = (), grace: float = 5) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds, the given processes (and what `roots`/`markers` find meanwhile)."""
    pids = set(pids)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 3)):
        pids |= descendants(roots, markers)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        while time.time() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.1)
    pids |= descendants(roots, markers)
    for pid in pids:  # a process forked during the SIGKILL round
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Node:
    """One `ray start --block` process and what identifies its process tree."""

    def __init__(self, name: str, proc: subprocess.Popen, temp_dir: Path, log: Path):
        self.name, self.proc, self.temp_dir, self.log = name, proc, temp_dir, log

    def tree(self) -> set:
        return descendants([self.proc.pid], [str(self.temp_dir)])

    def raylet_pids(self) -> List[int]:
        table = proc_table()
        return [pid for pid in self.tree() if pid in table and "/raylet/raylet " in table[pid][1] + " "]


class LoopbackCluster:
    """Head + mount-isolated worker node on 127.0.0.1, token auth, driven by the `ray` CLI (see module doc)."""

    def __init__(self, env: Optional[Dict[str, str]] = None, *, head_cpus: int = 1, worker_cpus: int = 2,
                 hide: Iterable[os.PathLike] = ()):
        self.base = Path(tempfile.mkdtemp(prefix="rrlc", dir="/tmp"))  # short: unix socket paths have a length limit
        self.home = self.base / "home"
        self.home.mkdir()
        self.head_cpus, self.worker_cpus = head_cpus, worker_cpus
        self.gcs, self.dashboard_port = free_ports(2)
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = {k: v for k, v in os.environ.items()
                    if not (k in ("RAY_ADDRESS", "RAYROBUST_STORAGE_PATH", "PYTEST_CURRENT_TEST")
                            or k.startswith(("RAY_AUTH", "RAY_JOB")))}
        self.env.update({"HOME": str(self.home), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                         "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1",
                         # a raylet on a loaded machine may need more than the default 30 s to register
                         "RAY_raylet_start_wait_time_s": "120",
                         **(env or {})})
        # What the worker node cannot see (module doc); directories below an earlier one are covered by it.
        self.hidden_dirs: List[str] = []
        for d in ["/tmp", "/var/tmp", str(REPO / "runs"), *map(str, hide)]:
            d = os.path.abspath(d)
            if not any(d == h or d.startswith(h.rstrip("/") + "/") for h in self.hidden_dirs):
                self.hidden_dirs.append(d)
        self.head: Optional[Node] = None
        self.worker: Optional[Node] = None
        self._retired: List[Node] = []  # earlier worker nodes (before a restart)
        self._retired_ids: set = set()  # their node ids
        self._workers_started = 0
        self._token: Optional[str] = None
        self._head_node_id: Optional[str] = None
        self._worker_node_id: Optional[str] = None

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 180, attempts: int = 3) -> "LoopbackCluster":
        """Start the head, then the worker node. On a loaded machine `ray start` can give up waiting for its
        raylet to register (a fixed 30 s in Ray); a node that exits while starting is removed and started
        again, `attempts` times at most."""
        gen = self.ray("get-auth-token", "--generate", timeout=60)
        if gen.returncode != 0:
            raise RuntimeError(f"ray get-auth-token --generate failed: {gen.stderr[-2000:]}")
        self._token = (self.home / ".ray" / "auth_token").read_text().strip()
        for attempt in range(1, attempts + 1):
            if attempt > 1:
                self.gcs, self.dashboard_port = free_ports(2)
                self.address = f"http://127.0.0.1:{self.dashboard_port}"
            self.head = self._start_node(
                f"head{attempt}",
                ["--head", f"--port={self.gcs}", f"--num-cpus={self.head_cpus}", '--resources={"head": 1}',
                 "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                 f"--ray-client-server-port={free_ports(1)[0]}"])
            try:
                self._head_node_id = self.wait_for_nodes(1, timeout)[0]
                break
            except RuntimeError:
                self._remove(self.head)
                if attempt == attempts:
                    raise
        self.start_worker(timeout, attempts)
        return self

    def _remove(self, node: Node) -> None:
        kill_processes(node.tree(), [node.proc.pid], [str(node.temp_dir)], grace=2)
        try:
            node.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self._retired.append(node)

    def _start_node(self, name: str, args: List[str], *, isolate: bool = False) -> Node:
        temp_dir = self.base / name
        temp_dir.mkdir()
        ports = free_ports(5)
        cmd = [RAY, "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
               f"--temp-dir={temp_dir}", f"--dashboard-agent-listen-port={ports[0]}",
               f"--dashboard-agent-grpc-port={ports[1]}", f"--runtime-env-agent-port={ports[2]}",
               f"--metrics-export-port={ports[3]}", f"--node-manager-port={ports[4]}", *args]
        env = dict(self.env)
        if isolate:
            env["RAY_AUTH_TOKEN"] = self._token  # its HOME (under /tmp) is hidden from it
            cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", self._isolation_script(temp_dir, cmd)]
        log = self.base / f"{name}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                    cwd="/")
        return Node(name, proc, temp_dir, log)

    def _isolation_script(self, temp_dir: Path, cmd: List[str]) -> str:
        """Shell run inside the worker's new mount namespace: hide `hidden_dirs`, keep the repository as it is
        now (without runs/) and the node's own temp dir, then exec `ray start`."""
        q = shlex.quote
        repo_entries = sorted(e for e in os.listdir(REPO) if e != "runs")
        lines = ["set -e",
                 f"mount -t tmpfs rr-staging {STAGING}",
                 f"mkdir {STAGING}/repo {STAGING}/temp",
                 f"mount --bind {q(str(REPO))} {STAGING}/repo",
                 f"mount --bind {q(str(temp_dir))} {STAGING}/temp"]
        lines += [f"mount -t tmpfs rr-hidden {q(d)}" for d in self.hidden_dirs if os.path.isdir(d)]
        # the repository may itself sit below a hidden directory (a clone in /tmp): its mount point first
        lines.append(f"mkdir -p {q(str(REPO))}")
        lines.append(f"mount -t tmpfs rr-repo {q(str(REPO))}")
        for e in repo_entries:
            src, dst = f"{STAGING}/repo/{e}", str(REPO / e)
            real = REPO / e
            if real.is_symlink():
                lines.append(f"ln -s {q(os.readlink(real))} {q(dst)}")
                continue
            lines.append(f"mkdir {q(dst)}" if real.is_dir() else f"touch {q(dst)}")
            lines.append(f"mount --bind {q(src)} {q(dst)}")
        lines += [f"mkdir -p {q(str(temp_dir))} {q(str(self.home))}",
                  f"mount --move {STAGING}/temp {q(str(temp_dir))}",
                  f"umount {STAGING}/repo", f"umount {STAGING}",
                  "exec " + " ".join(q(c) for c in cmd)]
        return "\n".join(lines)

    def start_worker(self, timeout: float = 180, attempts: int = 3) -> str:
        """Start a (new) worker node; returns its node id once the head sees it alive (see `start` on attempts)."""
        for attempt in range(1, attempts + 1):
            self._workers_started += 1
            self.worker = self._start_node(
                f"worker{self._workers_started}",
                [f"--address=127.0.0.1:{self.gcs}", f"--num-cpus={self.worker_cpus}", '--resources={"worker": 1}'],
                isolate=True)
            deadline = time.time() + timeout
            while time.time() < deadline and self.worker.proc.poll() is None:
                new = [nd["node_id"] for nd in self._nodes_quiet() if nd["state"] == "ALIVE"
                       and "worker" in (nd.get("resources_total") or {}) and nd["node_id"] not in self._retired_ids]
                if new:
                    self._worker_node_id = new[0]
                    return new[0]
                time.sleep(1)
            self._remove(self.worker)
        raise RuntimeError(f"the worker node did not come up ({attempts} attempts):\n{self.logs()}")

    def kill_worker_raylet(self) -> int:
        """SIGKILL the worker node's raylet and, at once, every process under it (a node failure: its tasks and
        actors die with it, whether or not a worker process would notice its raylet is gone); returns its pid.
        The tree is read before the kill: once the raylet is dead its workers are orphans outside it."""
        pids = self.worker.raylet_pids()
        if not pids:
            raise RuntimeError(f"no raylet in the worker node's process tree:\n{self.logs()}")
        under = descendants([pids[0]]) - {pids[0]}
        os.kill(pids[0], signal.SIGKILL)
        for pid in under:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids[0]

    def restart_worker(self, timeout: float = 180) -> str:
        """Remove what is left of the worker node and start a new one (a replacement machine); its node id."""
        self._remove(self.worker)
        self._retired_ids.add(self._worker_node_id)
        return self.start_worker(timeout)

    def stop(self) -> None:
        """Kill exactly this cluster's processes and remove its temp dir."""
        nodes = list({id(n): n for n in (self.worker, *self._retired, self.head) if n is not None}.values())
        pids = set().union(*(n.tree() for n in nodes)) if nodes else set()  # before orphans lose their parent link
        kill_processes(pids, [n.proc.pid for n in nodes], [str(self.base)])
        for n in nodes:
            try:
                n.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> "LoopbackCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- queries -----------------------------------------------------------------------------
    def get(self, path: str):
        req = urllib.request.Request(self.address + path, headers={"Authorization": f"Bearer {self._token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def nodes(self) -> List[dict]:
        return self.get("/api/v0/nodes?detail=true")["data"]["result"]["result"]

    def _nodes_quiet(self) -> List[dict]:
        try:
            return self.nodes()
        except (OSError, KeyError, ValueError):
            return []

    @property
    def head_node_id(self) -> str:
        return self._head_node_id

    @property
    def worker_node_id(self) -> str:
        """The current worker node's id (a new one after `restart_worker`)."""
        return self._worker_node_id

    @property
    def retired_worker_ids(self) -> set:
        return set(self._retired_ids)

    def alive_node_ids(self) -> set:
        return {nd["node_id"] for nd in self._nodes_quiet() if nd["state"] == "ALIVE"}

    def wait_for_nodes(self, n: int, timeout: float = 180) -> List[str]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for node in (self.head, self.worker):
                if node is not None and node.proc.poll() is not None:
                    raise RuntimeError(f"ray node {node.name} exited:\n{self.logs()}")
            try:
                alive = [nd["node_id"] for nd in self.nodes() if nd["state"] == "ALIVE"]
                if len(alive) >= n:
                    return alive
            except (OSError, KeyError, ValueError):
                pass
            time.sleep(1)
        raise RuntimeError(f"{n} nodes did not come up in {timeout}s:\n{self.logs()}")

    def job_status(self, submission_id: str) -> str:
        return self.get(f"/api/jobs/{submission_id}")["status"]

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-tail:]}" for p in sorted(self.base.glob("*.log")))

    # ---- jobs --------------------------------------------------------------------------------
    def ray(self, *args: str, env: Optional[Dict[str, str]] = None, timeout: float = 240) -> subprocess.CompletedProcess:
        return subprocess.run([RAY, *args], env=env or self.env, cwd=REPO, capture_output=True, text=True,
                              timeout=timeout)

    def _submit_cmd(self, args: List[str], env: Optional[Dict[str, str]], submission_id: Optional[str]) -> List[str]:
        cmd = [RAY, "job", "submit", "--address", self.address, "--working-dir", str(REPO)]
        if submission_id:
            cmd += ["--submission-id", submission_id]
        if env:
            cmd += ["--runtime-env-json", json.dumps({"env_vars": dict(env)})]
        return [*cmd, "--", *args]

    def submit(self, args: List[str], env: Optional[Dict[str, str]] = None, *, submission_id: Optional[str] = None,
               timeout: float = 600) -> Tuple[int, str]:
        """`ray job submit --working-dir <repo> -- *args` (e.g. ["python", "jobs/pipeline.py", ...]), waiting for the
        job; `env`: extra environment variables of the job. Returns (exit status, stdout + stderr)."""
        r = subprocess.run(self._submit_cmd(args, env, submission_id), env=self.env, cwd=REPO, capture_output=True,
                           text=True, timeout=timeout)
        return r.returncode, r.stdout + r.stderr

    def submit_async(self, args: List[str], env: Optional[Dict[str, str]] = None, *,
                     submission_id: Optional[str] = None) -> subprocess.Popen:
        """Like `submit`, without waiting: the `ray job submit` process (stdout and stderr merged, text)."""
        return subprocess.Popen(self._submit_cmd(args, env, submission_id), env=self.env, cwd=REPO, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
