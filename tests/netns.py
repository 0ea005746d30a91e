"""Separate hosts on one machine: Linux network namespaces joined by veth pairs on one bridge.

Each "host" is a namespace with its own address (10.M.0.N/24), its own loopback and its own firewall;
the test process reaches them from the root namespace through the bridge. Needs root and ``ip``;
:func:`unavailable` says why not when they are missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Dict, List, Optional


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def unavailable() -> Optional[str]:
    """Why namespaces cannot be made here (None: they can)."""
    if os.name != "posix" or not shutil.which("ip"):
        return "no `ip` command (iproute2) on this machine"
    if os.geteuid() != 0:
        return "network namespaces need root"
    name = f"mlprobe{os.getpid()}"
    r = _ip("netns", "add", name, check=False)
    if r.returncode != 0:
        return f"`ip netns add` failed: {r.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    return None


class Hosts:
    """Namespaces ``names`` on a private bridge; ``addr[name]`` is each one's address."""

    def __init__(self, names: List[str]):
        tag = os.getpid() % 200 + 20
        self.net = f"10.{tag}.0"
        self.bridge = f"mlbr{os.getpid() % 100000}"
        self.ns = {n: f"ml{os.getpid() % 100000}{n}" for n in names}
        self.addr: Dict[str, str] = {}
        self._veths: List[str] = []

    def __enter__(self) -> "Hosts":
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.net}.254/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            # bridged frames pass the root namespace's FORWARD chain (br_netfilter), whose policy Docker sets to
            # DROP: let this bridge's own traffic through
            self._fw = ["FORWARD", "-i", self.bridge, "-o", self.bridge, "-j", "ACCEPT"]
            if shutil.which("iptables"):
                subprocess.run(["iptables", "-I", *self._fw], capture_output=True)
            for i, (n, ns) in enumerate(self.ns.items()):
                _ip("netns", "add", ns)
                outer = f"{self.bridge[:8]}v{i}"
                _ip("link", "add", outer, "type", "veth", "peer", "name", "eth0", "netns", ns)
                self._veths.append(outer)
                _ip("link", "set", outer, "master", self.bridge)
                _ip("link", "set", outer, "up")
                self.addr[n] = f"{self.net}.{i + 1}"
                _ip("-n", ns, "addr", "add", f"{self.addr[n]}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        if getattr(self, "_fw", None) and shutil.which("iptables"):
            subprocess.run(["iptables", "-D", *self._fw], capture_output=True)
        for v in self._veths:
            _ip("link", "del", v, check=False)
        for ns in self.ns.values():
            _ip("netns", "del", ns, check=False)
        _ip("link", "del", self.bridge, check=False)

    def cmd(self, name: str, argv: List[str]) -> List[str]:
        """``argv`` run inside host ``name``."""
        return ["ip", "netns", "exec", self.ns[name], *argv]

    def drop_inbound(self, name: str) -> str:
        """Host ``name`` accepts no inbound TCP connection from other hosts (like a home router's NAT);
        returns how: an iptables rule, or (without iptables) nothing and the caller binds to loopback."""
        if not shutil.which("iptables"):
            return ""
        ns = self.ns[name]
        for rule in (["-A", "INPUT", "-i", "lo", "-j", "ACCEPT"],
                     ["-A", "INPUT", "-p", "tcp", "--syn", "-j", "DROP"]):
            subprocess.run(["ip", "netns", "exec", ns, "iptables", *rule], check=True, capture_output=True)
        return "iptables"
