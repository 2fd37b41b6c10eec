"""Network namespaces for the fault tests: each holds servers behind its own veth pair, all on this machine.

Namespace `llmfx-N` gets the veth pair fxNh (host side, 10.200.N.1/30) / fxNn (namespace side, 10.200.N.2/30);
the platform runs on the host and reaches the servers at 10.200.N.2. Faults are injected inside the namespace:
iptables DROP (a blackhole: no reset), iptables `statistic` (random loss), tc netem (delay and loss) where the kernel
has it. `destroy()` removes the namespace, which removes its veth pair, rules and qdiscs with it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

PREFIX = "llmfx-"
ROOT = Path(__file__).resolve().parents[2]


def unavailable_reason() -> str | None:
    """Why the fault tests cannot run here (None when they can)."""
    if os.geteuid() != 0:
        return "needs root (creates network namespaces and veth pairs)"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"needs `{tool}` (apt-get install -y iproute2 iptables)"
    if subprocess.run(["ip", "netns", "list"], capture_output=True, timeout=10).returncode != 0:
        return "`ip netns` is unavailable"
    return None


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=15)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {result.stderr.strip()}")
    return result


def cleanup_leftovers() -> None:
    """Remove every namespace an earlier, killed run left behind (their veth pairs go with them)."""
    for line in _run("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith(PREFIX):
            _run("ip", "netns", "del", name, check=False)


class Netns:
    """One namespace with a veth pair to the host and the processes started in it."""

    def __init__(self, index: int) -> None:
        self.name = f"{PREFIX}{index}"
        self.host_if, self.ns_if = f"fx{index}h", f"fx{index}n"
        self.host_ip, self.ip = f"10.200.{index}.1", f"10.200.{index}.2"
        self.procs: list[subprocess.Popen[bytes]] = []

    def create(self) -> Netns:
        """Create the namespace and its veth pair, addressed and up."""
        self.destroy()
        _run("ip", "netns", "add", self.name)
        _run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if, "netns", self.name)
        _run("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        _run("ip", "link", "set", self.host_if, "up")
        self.run("ip", "addr", "add", f"{self.ip}/30", "dev", self.ns_if)
        self.run("ip", "link", "set", self.ns_if, "up")
        self.run("ip", "link", "set", "lo", "up")
        return self

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespace."""
        return _run("ip", "netns", "exec", self.name, *argv, check=check)

    def spawn(self, *argv: str) -> subprocess.Popen[bytes]:
        """Start a long-running process inside the namespace (`ip netns exec` execs it: same pid)."""
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.name, *argv], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self.procs.append(proc)
        return proc

    def spawn_mock(self, *, port: int = 8000, host: str | None = None, models: tuple[str, ...] = ("served-chat",)):
        """The bundled mock vLLM in the namespace; waits until it answers /health (from the host when on self.ip)."""
        argv = [sys.executable, "-m", "backends.mock_vllm", "--host", host or self.ip, "--port", str(port)]
        for model in models:
            argv += ["--model", model]
        proc = self.spawn(*argv, "--embed-model", "")
        if host is None:
            wait_http(f"http://{self.ip}:{port}/health", proc)
        return proc

    def iptables(self, *rule: str) -> None:
        """Add or remove a rule in the namespace's own firewall (the host's is never touched)."""
        self.run("iptables", "-w", "5", *rule)

    def blackhole(self) -> None:
        """Drop every packet that reaches the namespace: no answer, no reset."""
        self.iptables("-I", "INPUT", "1", "-j", "DROP")

    def heal(self) -> None:
        """Remove every iptables rule of the namespace."""
        self.iptables("-F", "INPUT")
        self.iptables("-F", "OUTPUT")

    def netem(self, spec: str) -> bool:
        """tc netem on the namespace side of the veth (its egress); False when the kernel has no sch_netem."""
        added = self.run("tc", "qdisc", "add", "dev", self.ns_if, "root", "netem", *spec.split(), check=False)
        return added.returncode == 0

    def destroy(self) -> None:
        """Stop the processes, delete the namespace (its veth pair, rules and qdiscs go with it)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
            if proc.stderr is not None:
                proc.stderr.close()
        self.procs.clear()
        _run("ip", "netns", "del", self.name, check=False)
        _run("ip", "link", "del", self.host_if, check=False)


def wait_http(url: str, proc: subprocess.Popen[bytes], within_s: float = 20.0) -> None:
    """Poll url until it answers 200; fail early when the process died."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace")[-2000:] if proc.stderr else ""
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}: {err}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {within_s} s")


def wait_tcp(host: str, port: int, proc: subprocess.Popen[bytes], within_s: float = 20.0) -> None:
    """Poll until a TCP connection to host:port succeeds."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{host}:{port} did not accept within {within_s} s")
