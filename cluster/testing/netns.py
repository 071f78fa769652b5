"""A real Ray cluster of several nodes on one machine, each node in its own network namespace.

Why namespaces: with the loopback-only setting Ray refuses a second node, and without it Ray
registers nodes under the machine's interface address, where tests must not send traffic. Here each
node is a host of its own (``ip netns add``, a veth pair on a bridge the test creates, an address in a
private /24), so Ray's nodes talk to each other over that test network only, and a node can die for
real: every process in its namespace is killed at once (``ip netns pids``), raylet, workers and
actors, as when a machine goes away. Needs root, iproute2 and a kernel with network namespaces;
everything made is removed again, processes first.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
# variables of the loopback-only test environment that a multi-node cluster must not see
LOCAL_ONLY = ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "RAY_ADDRESS")


@dataclass
class Node:
    name: str
    cpus: int
    resources: dict[str, float] = field(default_factory=dict)
    address: str = ""
    process: subprocess.Popen | None = None


def _ip(*args: str, netns: str | None = None) -> None:
    cmd = ["ip", *(["netns", "exec", netns, "ip"] if netns else []), *args]
    subprocess.run(cmd, check=True, capture_output=True, text=True)


class NamespaceCluster:
    """``nodes[0]`` is the head. ``run`` starts a command on the head node, as a user would start the
    driver there; ``kill`` takes a node away, ``restart`` brings a new node up at its address."""

    def __init__(self, nodes: list[Node], workdir: Path) -> None:
        tag = os.getpid() % 100000
        self.prefix, self.bridge = f"prl{tag}", f"pb{tag}"
        self.subnet = f"10.213.{tag % 250}"
        self.nodes = {n.name: n for n in nodes}
        self.head = nodes[0]
        for i, node in enumerate(nodes, start=1):
            node.address = f"{self.subnet}.{i}"
        self.workdir = workdir
        self.temp_dir = Path(f"/tmp/{self.prefix}")  # short: Ray's socket paths must fit in 107 bytes
        self.gcs = f"{self.head.address}:6379"
        self.logs = workdir / "ray-logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    # -- the network ---------------------------------------------------------------------------
    def netns(self, node: Node) -> str:
        return f"{self.prefix}{node.name}"

    def _network_up(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("link", "set", self.bridge, "up")
        for i, node in enumerate(self.nodes.values(), start=1):
            ns, veth = self.netns(node), f"pv{self.prefix[3:]}{i}"
            _ip("netns", "add", ns)
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", veth, "master", self.bridge, "up")
            _ip("addr", "add", f"{node.address}/24", "dev", "eth0", netns=ns)
            _ip("link", "set", "eth0", "up", netns=ns)
            _ip("link", "set", "lo", "up", netns=ns)

    def env(self) -> dict[str, str]:
        """The test's offline environment, minus what keeps Ray on loopback; the nodes' addresses bypass
        the (dead) proxy, so nothing leaves the test network."""
        env = {k: v for k, v in os.environ.items() if k not in LOCAL_ONLY}
        nodes = ",".join(n.address for n in self.nodes.values())
        env["NO_PROXY"] = env["no_proxy"] = f"127.0.0.1,localhost,{nodes}"
        env["RAY_health_check_period_ms"] = "1000"  # a dead node is noticed in seconds, not half a minute
        env["RAY_health_check_failure_threshold"] = "3"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH")]))
        return env

    # -- Ray nodes -----------------------------------------------------------------------------
    def _start_node(self, node: Node) -> None:
        import json

        cmd = ["ip", "netns", "exec", self.netns(node), str(VENV_BIN / "ray"), "start", "--block",
               "--node-ip-address", node.address, "--num-cpus", str(node.cpus), "--disable-usage-stats",
               "--resources", json.dumps(node.resources)]
        if node is self.head:
            cmd += ["--head", "--port", "6379", "--include-dashboard=false", "--temp-dir", str(self.temp_dir)]
        else:
            cmd += ["--address", self.gcs]
        log = open(self.logs / f"{node.name}.log", "a")
        node.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(), cwd=self.workdir,
                                        start_new_session=True)

    def wait_nodes(self, alive: int, timeout_s: float = 120) -> None:
        """Until Ray counts ``alive`` live nodes (asked from inside the head's namespace)."""
        # the address, not "auto": auto also finds any other Ray of this machine (the suite's local one)
        probe = (f"import ray; ray.init(address={self.gcs!r}, logging_level='ERROR'); "
                 "print(sum(n['Alive'] for n in ray.nodes()))")
        deadline = time.monotonic() + timeout_s
        seen = "nothing"
        while time.monotonic() < deadline:
            out = self.run([sys.executable, "-c", probe], timeout=60, check=False)
            seen = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-300:]
            if seen == str(alive):
                return
            time.sleep(1)
        raise TimeoutError(f"the cluster did not reach {alive} live nodes in {timeout_s:g}s (last: {seen}); "
                           f"node logs in {self.logs}")

    def start(self) -> "NamespaceCluster":
        self._network_up()
        for count, node in enumerate(self.nodes.values(), start=1):  # one by one: nodes share the session folder
            self._start_node(node)
            self.wait_nodes(count)
        return self

    def kill(self, name: str) -> None:
        """Node ``name`` goes away: every process in its namespace is killed with SIGKILL at once."""
        node = self.nodes[name]
        pids = subprocess.run(["ip", "netns", "pids", self.netns(node)], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        if node.process is not None:
            node.process.wait(timeout=30)

    def processes(self, title: str, node: str | None = None) -> list[int]:
        """Pids whose process title starts with ``title`` (Ray names a worker ``ray::Class.method`` while
        it runs that method, ``ray::Class`` when idle), on node ``node`` or any."""
        if node is None:
            pids = [p for p in os.listdir("/proc") if p.isdigit()]
        else:
            pids = subprocess.run(["ip", "netns", "pids", self.netns(self.nodes[node])], capture_output=True,
                                  text=True).stdout.split()
        found = []
        for pid in pids:
            try:
                args = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:  # gone meanwhile
                continue
            if args.startswith(title):
                found.append(int(pid))
        return found

    def restart(self, name: str) -> None:
        """A new node at the address of ``name`` (a replaced machine), with the same resources."""
        self._start_node(self.nodes[name])

    # -- commands on the head node ---------------------------------------------------------------
    def popen(self, cmd: list[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.netns(self.head), *cmd], env=self.env(), cwd=self.workdir,
                                text=True, **kwargs)

    def run(self, cmd: list[str], timeout: float, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.netns(self.head), *cmd], env=self.env(), cwd=self.workdir,
                              capture_output=True, text=True, timeout=timeout, check=check)

    def stop(self) -> None:
        for name in reversed(list(self.nodes)):
            try:
                self.kill(name)
            except (subprocess.SubprocessError, OSError):
                pass
        for node in self.nodes.values():
            subprocess.run(["ip", "netns", "del", self.netns(node)], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
