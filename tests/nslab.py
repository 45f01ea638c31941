"""Throw-away network namespaces for kernel tests, the lab and the benchmarks.

Owns: creating namespaces under a unique per-run prefix, running commands and Python callables
inside them, linking them with veth pairs, and removing every one of them (also on failure).
Never touches the root namespace: callables run in a forked child that entered the namespace,
so the test process itself never changes namespace, and no link ever leads to the root one.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pickle
import re
import secrets
import shlex
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any

CLONE_NEWNET = 0x40000000
RUN_PREFIX = f"tgr{secrets.token_hex(3)}"
_libc = ctypes.CDLL(None, use_errno=True)


class CommandFailed(RuntimeError):
    pass


class Netns:
    """One network namespace named RUN_PREFIX-<name>, with lo up."""

    def __init__(self, name: str) -> None:
        self.name = f"{RUN_PREFIX}-{name}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.run("ip link set lo up")

    # ---- commands -------------------------------------------------------------------------
    def run(
        self, cmd: str | list[str], check: bool = True, timeout: float = 60, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        argv = shlex.split(cmd) if isinstance(cmd, str) else cmd
        res = subprocess.run(
            ["ip", "netns", "exec", self.name, *argv],
            capture_output=True, text=True, timeout=timeout, input=input,
        )
        if check and res.returncode != 0:
            raise CommandFailed(
                f"[{self.name}] {' '.join(argv)} -> {res.returncode}\n{res.stdout}{res.stderr}"
            )
        return res

    def out(self, cmd: str | list[str]) -> str:
        return self.run(cmd).stdout

    def popen(self, cmd: str | list[str], **kw: Any) -> subprocess.Popen[bytes]:
        """Start a long-running process inside; it is ended (by PID) when the namespace goes."""
        argv = shlex.split(cmd) if isinstance(cmd, str) else cmd
        kw.setdefault("start_new_session", True)
        proc = subprocess.Popen(["ip", "netns", "exec", self.name, *argv], **kw)
        self.procs.append(proc)
        return proc

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 120, **kwargs: Any) -> Any:
        """Run fn(*args, **kwargs) in a forked child inside this namespace; return its result.

        The parent never changes namespace, so a test cannot leak into the root one."""
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            os.close(rfd)
            try:
                fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns failed")
                payload = pickle.dumps(("ok", fn(*args, **kwargs)))
            except BaseException as e:  # report everything to the parent
                payload = pickle.dumps(("err", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
            with os.fdopen(wfd, "wb") as w:
                w.write(payload)
            os._exit(0)
        os.close(wfd)
        with os.fdopen(rfd, "rb") as r:
            deadline = time.monotonic() + timeout
            data = b""
            os.set_blocking(r.fileno(), False)
            while True:
                try:
                    chunk = r.read()
                except BlockingIOError:
                    chunk = None
                if chunk:
                    data += chunk
                elif chunk == b"":
                    break
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    raise TimeoutError(f"call {fn.__name__} in {self.name} timed out")
                time.sleep(0.002)
        os.waitpid(pid, 0)
        status, value = pickle.loads(data)
        if status == "err":
            raise RuntimeError(f"in namespace {self.name}: {value}")
        return value

    # ---- teardown -------------------------------------------------------------------------
    def stop_processes(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        self.procs.clear()

    def delete(self) -> None:
        self.stop_processes()
        # processes we did not start by Popen (e.g. daemonised openvpn) are found by namespace
        for pid in namespace_pids(self.name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


def namespace_pids(name: str) -> list[int]:
    res = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
    return [int(p) for p in res.stdout.split()] if res.returncode == 0 else []


def veth(a: Netns, a_if: str, b: Netns, b_if: str) -> None:
    """Link two namespaces of ours with a veth pair (created inside `a`, so never in root)."""
    a.run(f"ip link add {a_if} type veth peer name {b_if} netns {b.name}")
    a.run(f"ip link set {a_if} up")
    b.run(f"ip link set {b_if} up")


def wait_for(pred: Callable[[], Any], timeout: float = 10, interval: float = 0.02,
             what: str = "condition") -> Any:
    """Poll pred() until truthy, with a bound; the bound is a failure, never a pass."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def kernel_snapshot(out: Callable[[list[str]], str], sysctls: Iterable[str]) -> dict[str, str]:
    """What a user compares before/after: rules, all routes, legacy tables without counters,
    and the given sysctls ("" when absent). `out` runs a command on the host and returns stdout."""
    def save(cmd: str) -> str:
        # A legacy table springs into being (empty) once read; an empty one counts as absent.
        text = "\n".join(x for x in out([cmd]).splitlines() if not x.startswith("#"))
        text = re.sub(r"\[\d+:\d+\]", "[0:0]", text)
        return "".join("*" + block for block in text.split("*")[1:]
                       if any(x.startswith(("-A", ":")) and not re.match(r":[A-Z]+ ACCEPT ", x)
                              for x in block.splitlines()))

    def routes(family: str) -> str:
        # IPv6 link-local and local-table entries come and go with address autoconfiguration.
        return "\n".join(x for x in out(["ip", family, "route", "show", "table", "all"]).splitlines()
                         if "fe80::" not in x and "table local" not in x)

    snap = {
        "rules4": out(["ip", "-4", "rule", "show"]),
        "rules6": out(["ip", "-6", "rule", "show"]),
        "routes4": routes("-4"),
        "routes6": routes("-6"),
        "ipt4": save("iptables-legacy-save"),
        "ipt6": save("ip6tables-legacy-save"),
    }
    for key in sysctls:
        snap[key] = out(["sh", "-c", f"sysctl -n {key} 2>/dev/null || true"]).strip()
    return snap


def remove_all(namespaces: Iterable[Netns]) -> None:
    for ns in namespaces:
        ns.delete()


def sweep_run_prefix() -> None:
    """Remove any namespace of this run that a crashed fixture left behind."""
    res = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    for line in res.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(RUN_PREFIX + "-"):
            for pid in namespace_pids(name):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


if __name__ == "__main__":
    sys.exit("nslab is a library")
