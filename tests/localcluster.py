"""A multi-node Ray cluster on this one machine, started as a user starts one: `ray start` processes.

A head without GPUs and worker nodes that declare GPUs (Ray schedules a declared GPU like a real one; the
trials then find no CUDA and train on the CPU). Each node has its own temp folder, which is how its processes
are found again: a node is killed (SIGKILL to its raylet, as a lost machine would be) and the whole cluster is
stopped by process id, never with `ray stop`, which would take down every other Ray on the machine.
Used by tests/test_cluster.py and bench/cluster.py.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

RAY = str(Path(sys.executable).parent / "ray")  # the ray CLI installed beside this Python


def token_env() -> dict[str, str]:
    """What a worker node or a client of a token-authenticated head needs (Ray >= 2.59): the token is read from
    ~/.ray/auth_token, which the head wrote, and sent only with RAY_AUTH_MODE=token."""
    return {**os.environ, "RAY_AUTH_MODE": "token"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Node:
    name: str
    temp_dir: Path
    gpus: int
    cpus: int
    node_id: str = ""

    def processes(self) -> list[psutil.Process]:
        """This node's Ray processes: those whose command line names its temp folder (raylet, GCS, agents), and
        their children (the workers, whose command lines Ray rewrites to `ray::...`)."""
        mine: dict[int, psutil.Process] = {}
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(str(self.temp_dir) in arg for arg in p.info["cmdline"] or []):
                    mine[p.pid] = p
                    mine.update({c.pid: c for c in p.children(recursive=True)})
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return list(mine.values())

    def raylet(self) -> psutil.Process | None:
        for p in self.processes():
            try:
                if Path((p.cmdline() or [""])[0]).name == "raylet":
                    return p
            except psutil.NoSuchProcess:
                continue
        return None


@dataclass
class LocalCluster:
    """`with LocalCluster(workers=2, worker_gpus=1) as cluster:` ... `cluster.address`, `cluster.kill(1)`."""
    workers: int = 2
    worker_cpus: int = 2
    worker_gpus: int = 1
    head_cpus: int = 0
    worker_env: dict[str, str] = field(default_factory=dict)  # set for the worker nodes' processes only
    nodes: list[Node] = field(default_factory=list)
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="kdc-", dir="/tmp")))  # short: sockets

    def __post_init__(self) -> None:
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"

    def __enter__(self) -> LocalCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _ray_start(self, node: Node, *args: str) -> None:
        node.temp_dir.mkdir(parents=True)
        subprocess.run([RAY, "start", *args, f"--num-cpus={node.cpus}", f"--num-gpus={node.gpus}",
                        f"--temp-dir={node.temp_dir}", "--disable-usage-stats"], check=True,
                       env={**token_env(), **(self.worker_env if node.name != "head" else {})},
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)

    def start(self) -> None:
        head = Node("head", self.root / "head", gpus=0, cpus=self.head_cpus)
        self.nodes.append(head)
        self._ray_start(head, "--head", f"--port={self.port}", "--include-dashboard=false")
        for i in range(self.workers):
            self.add_worker(f"worker{i + 1}")

    def _find_node_ids(self) -> None:
        """Each node's Ray node id, matched by the temp folder in its raylet's socket path (asked in a short
        client process, so this one never joins the cluster)."""
        script = ("import json, ray; ray.init(address=%r, logging_level='ERROR', log_to_driver=False); "
                  "print(json.dumps({n['NodeID']: n['RayletSocketName'] for n in ray.nodes() if n['Alive']}))")
        out = subprocess.run([sys.executable, "-c", script % self.address], check=True, capture_output=True,
                             text=True, env=token_env(), timeout=120).stdout
        sockets = json.loads(out.strip().splitlines()[-1])
        for node in self.nodes:
            node.node_id = next((i for i, sock in sockets.items() if sock.startswith(f"{node.temp_dir}/")),
                                node.node_id)

    def add_worker(self, name: str) -> Node:
        node = Node(name, self.root / name, gpus=self.worker_gpus, cpus=self.worker_cpus)
        self.nodes.append(node)
        self._ray_start(node, f"--address={self.address}")
        self._find_node_ids()
        return node

    def kill(self, index: int) -> int:
        """SIGKILL node `index`'s raylet, as a machine lost mid-search: the head sees the node die and its
        workers die with it. Returns the raylet's pid."""
        raylet = self.nodes[index].raylet()
        assert raylet is not None, f"no raylet for {self.nodes[index].name}"
        raylet.send_signal(signal.SIGKILL)
        return raylet.pid

    def stop(self) -> None:
        """Every process of this cluster, by process id (workers first, the head last)."""
        for node in reversed(self.nodes):
            for p in node.processes():
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.send_signal(signal.SIGKILL)
        deadline = time.time() + 20
        while time.time() < deadline and any(n.processes() for n in self.nodes):
            time.sleep(0.2)
        shutil.rmtree(self.root, ignore_errors=True)
