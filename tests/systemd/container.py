"""A booted Debian bookworm container with a real systemd as PID 1, for the systemd tests.

Owns: the cached bookworm root filesystem (built once with debootstrap from the mirror apt already
uses, under CACHE, keyed by ROOTFS_STAMP; never written to afterwards: every boot is
--volatile=overlay), the cached wheelhouse of tagrouted's dependencies (the versions the test venv
runs, built on the host), one systemd-nspawn container per Container object, and everything that
container leaves behind on the host (the nspawn process and its empty "payload" cgroups).
Never touches: the host's network namespace (--private-network: the container has its own, with
only lo until a test adds links inside it), the host's systemd (there is none here: --register=no,
--keep-unit), or any process it did not start.

Traps that bit the recipe (../shared/recipes/systemd-nspawn.sh) and are handled here:
- without a host systemd, nspawn must run with --register=no --keep-unit, and it leaves empty
  "payload" cgroups behind: removed on close();
- the first SIGTERM to nspawn halts the container cleanly, a second one terminates it at once;
- `systemctl reload` returns before the daemon finished: callers poll for the effect (wait_for);
- this kernel has no dummy link driver: links inside the container are veth pairs and tun devices.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

CACHE = Path(os.environ.get("TAGROUTED_TEST_CACHE", "/var/cache/tagrouted-test"))
# Bump ROOTFS_VERSION when the recipe changes in a way the package list does not show.
ROOTFS_VERSION = 1
SUITE = "bookworm"
# What the daemon needs inside: python3 + pip (to install the wheels), iproute2 and iptables (its
# libiptc/libxtables, and the tools the test reads the state with), nftables and python3-nftables
# (libnftables and its binding, for the default backend), procps (kill, ps), systemd + dbus.
DEBIAN_PACKAGES = (
    "systemd", "systemd-sysv", "dbus", "procps", "python3", "python3-pip", "iproute2", "iptables",
    "nftables", "python3-nftables",
)
ROOTFS_STAMP = hashlib.sha1(
    f"{ROOTFS_VERSION} {SUITE} {' '.join(DEBIAN_PACKAGES)}".encode()
).hexdigest()[:12]
# The container's own PATH: never inherit the host's environment (venv, PYTHONPATH, ...).
INNER_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8",
             "SYSTEMD_COLORS=0", "SYSTEMD_PAGER=", "TERM=dumb"]
PAYLOAD_MOUNT = "/mnt/tagrouted-test"  # the host's payload directory, bound read-only inside


class ContainerError(RuntimeError):
    pass


def _log(msg: str) -> None:
    print(f"[systemd-container] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise cache builds between concurrent test runs on the same machine."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def apt_mirror() -> str:
    """The Debian mirror apt already uses here: the first source that serves SUITE itself."""
    entries: list[tuple[list[str], list[str]]] = []  # (URIs, suites) per deb822 stanza or line
    for sources in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", sources.read_text(errors="replace")):
            fields = dict(re.findall(r"^(\w[\w-]*):[ \t]*(.*)$", stanza, re.M))
            if "deb" in fields.get("Types", "").split() and fields.get("Enabled", "yes") != "no":
                entries.append((fields.get("URIs", "").split(), fields.get("Suites", "").split()))
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.list"))]:
        with contextlib.suppress(OSError):
            for line in path.read_text(errors="replace").splitlines():
                # `deb [signed-by=... arch=...] URI SUITE ...`: the URI is the first word after options
                words = re.sub(r"\[[^]]*\]", " ", line).split()
                if len(words) > 2 and words[0] == "deb":
                    entries.append(([words[1]], [words[2]]))
    for uris, suites in entries:
        if SUITE in suites and uris:
            return uris[0]
    return "http://deb.debian.org/debian"


def rootfs_path() -> Path:
    return CACHE / f"rootfs-{SUITE}-{ROOTFS_STAMP}"


def ensure_rootfs(timeout: float = 900) -> tuple[Path, float | None]:
    """The cached rootfs, built now if absent; returns (path, seconds spent building or None).

    Built into a scratch directory and renamed into place only when debootstrap succeeded, so a
    half-built tree (a killed run, a mirror hiccup) is never mistaken for a complete one."""
    final = rootfs_path()
    complete = final / ".tagrouted-test-complete"
    if complete.exists():
        return final, None
    with _locked(CACHE / "rootfs.lock"):
        if complete.exists():
            return final, None
        scratch = CACHE / f"{final.name}.building"
        shutil.rmtree(scratch, ignore_errors=True)
        mirror = apt_mirror()
        _log(f"building the {SUITE} rootfs once with debootstrap from {mirror} into {final} ...")
        t0 = time.monotonic()
        log = CACHE / "debootstrap.log"
        with open(log, "w") as out:
            res = subprocess.run(
                ["debootstrap", "--variant=minbase", f"--include={','.join(DEBIAN_PACKAGES)}",
                 SUITE, str(scratch), mirror],
                stdout=out, stderr=subprocess.STDOUT, timeout=timeout,
            )
        if res.returncode != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
            shutil.rmtree(scratch, ignore_errors=True)
            raise ContainerError(f"debootstrap failed ({res.returncode}), see {log}:\n{tail}")
        # Smaller and quieter boots: no getty on the (passive) console, no apt timers.
        (scratch / "etc/hostname").write_text("tagrouted-test\n")
        for unit in ("console-getty.service", "getty@.service", "apt-daily.timer",
                     "apt-daily-upgrade.timer", "e2scrub_all.timer", "fstrim.timer"):
            mask = scratch / "etc/systemd/system" / unit
            if not mask.exists():
                mask.symlink_to("/dev/null")
        (scratch / ".tagrouted-test-complete").write_text(f"{ROOTFS_STAMP}\n")
        shutil.rmtree(final, ignore_errors=True)
        scratch.rename(final)
        for stale in CACHE.glob(f"rootfs-{SUITE}-*"):  # older recipes' trees: ~340 MB each
            if stale != final and not stale.name.endswith(".building"):
                shutil.rmtree(stale, ignore_errors=True)
        seconds = time.monotonic() - t0
        _log(f"rootfs built in {seconds:.0f}s")
        return final, seconds


# ---- wheels -----------------------------------------------------------------------------------
def _project_requirements(repo: Path) -> list[str]:
    """tagrouted's dependencies pinned to the versions installed in the test venv."""
    import tomllib

    deps = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = []
    for dep in deps:
        name = dep.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip()
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pins.append(dep)  # not in the venv: let pip pick what pyproject allows
    return sorted(pins)


def ensure_wheelhouse(repo: Path, timeout: float = 600) -> tuple[Path, float | None]:
    """Wheels of the dependencies (same versions as the venv), built on the host once and cached.

    Why not Debian's python3-* packages inside: bookworm has pyroute2 0.7.2 and watchdog 2.2.1,
    older than pyproject allows (>=0.7.12, >=3.0), and python-iptables 1.0.1 where the suite runs
    1.2.0; the container should run what every other test runs. The host and the container are
    both Debian bookworm with CPython 3.11, so wheels built here (systemd-python and
    python-iptables compile C extensions) load inside. The container has no network
    (--private-network): it installs with --no-index from these wheels."""
    pins = _project_requirements(repo)
    key = hashlib.sha1(" ".join(pins).encode()).hexdigest()[:12]
    house = CACHE / f"wheels-{key}"
    complete = house / ".complete"
    if complete.exists():
        return house, None
    with _locked(CACHE / "wheels.lock"):
        if complete.exists():
            return house, None
        scratch = CACHE / f"wheels-{key}.building"
        shutil.rmtree(scratch, ignore_errors=True)
        t0 = time.monotonic()
        _log(f"building dependency wheels once: {' '.join(pins)}")
        res = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "-w", str(scratch), *pins],  # + their deps
            capture_output=True, text=True, timeout=timeout,
        )
        if res.returncode != 0:
            shutil.rmtree(scratch, ignore_errors=True)
            raise ContainerError(f"pip wheel failed:\n{res.stdout}{res.stderr}")
        (scratch / ".complete").write_text(" ".join(pins) + "\n")
        shutil.rmtree(house, ignore_errors=True)
        scratch.rename(house)
        return house, time.monotonic() - t0


def build_project_wheel(repo: Path, out_dir: Path, timeout: float = 300) -> Path:
    """A wheel of the checkout as it is now (never cached: it is what is under test)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tagrouted-wheel-") as build_tmp:
        # Build from a copy: setuptools writes build/ and *.egg-info next to the sources.
        src = Path(build_tmp) / "src"
        shutil.copytree(repo, src, ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
            ".ruff_cache", "tests"))
        res = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
             "-w", str(out_dir), str(src)],
            capture_output=True, text=True, timeout=timeout,
        )
        if res.returncode != 0:
            raise ContainerError(f"building the tagrouted wheel failed:\n{res.stdout}{res.stderr}")
    wheels = sorted(out_dir.glob("tagrouted-*.whl"))
    if not wheels:
        raise ContainerError(f"no tagrouted wheel in {out_dir}")
    return wheels[-1]


# ---- the container ----------------------------------------------------------------------------
def nspawn_unavailable_reason() -> str | None:
    """Why systemd-nspawn cannot run here at all, or None (then failures are real failures)."""
    if os.geteuid() != 0:
        return "needs root (systemd-nspawn)"
    for tool in ("systemd-nspawn", "debootstrap", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/bootstrap installs it)"
    if not Path("/sys/fs/cgroup").is_dir():
        return "no cgroup filesystem"
    return None


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                kids += [int(k) for k in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return kids


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _payload_cgroup_dirs() -> list[Path]:
    """Where nspawn --keep-unit puts its 'payload' cgroups: below this process's own cgroups."""
    mounts: dict[str, Path] = {}  # "" for cgroup2, else the v1 hierarchy's controller list
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fstype, _, opts = [*right.split(), "", "", ""][:3]
        mount_point = Path(left.split()[4])
        if fstype == "cgroup2":
            mounts[""] = mount_point
        elif fstype == "cgroup":
            for opt in opts.split(","):
                if opt.startswith("name=") or opt == "systemd":
                    mounts[opt] = mount_point
    dirs: list[Path] = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        mount = mounts.get(controllers)
        if mount is not None:
            dirs.append(mount / path.lstrip("/") / "payload")
    return dirs


class Container:
    """One booted container: `run()` executes a command inside it (all its namespaces)."""

    def __init__(self, rootfs: Path, payload: Path, name: str, console_log: Path) -> None:
        self.rootfs = rootfs
        self.payload = payload
        self.name = name
        self.console_log = console_log
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.leader = 0  # host PID of the container's PID 1
        self.boot_seconds = 0.0
        self._cgroups_before = {d for d in _payload_cgroup_dirs() if d.exists()}

    # ---- lifecycle ----------------------------------------------------------------------------
    def boot(self, timeout: float = 90) -> str:
        """Start the container and wait until systemd says the system is up; return that state."""
        t0 = time.monotonic()
        env = dict(os.environ, SYSTEMD_NSPAWN_UNIFIED_HIERARCHY="1")  # pure cgroup v2 inside
        with open(self.console_log, "wb") as console:
            self.nspawn = subprocess.Popen(
                ["systemd-nspawn", "--boot", "--private-network", "--register=no", "--keep-unit",
                 "--volatile=overlay", "--console=passive", "--quiet",
                 f"--machine={self.name}", f"--directory={self.rootfs}",
                 f"--bind-ro={self.payload}:{PAYLOAD_MOUNT}"],
                stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,  # a Ctrl-C on the test run must not reach nspawn directly
            )
        deadline = time.monotonic() + timeout
        while not self.leader:
            if self.nspawn.poll() is not None:
                raise ContainerError(f"systemd-nspawn exited ({self.nspawn.returncode}):\n"
                                     + self.console())
            for kid in _children(self.nspawn.pid):
                if _comm(kid) == "systemd":
                    self.leader = kid
            if time.monotonic() > deadline:
                raise ContainerError("the container's systemd did not start:\n" + self.console())
            time.sleep(0.05)
        while self.run(["test", "-S", "/run/systemd/private"], check=False).returncode != 0:
            if time.monotonic() > deadline or self.nspawn.poll() is not None:
                raise ContainerError("systemd's private socket never appeared:\n" + self.console())
            time.sleep(0.1)
        left = max(5.0, deadline - time.monotonic())
        state = self.run(["systemctl", "is-system-running", "--wait"], check=False,
                         timeout=left + 5).stdout.strip()
        self.boot_seconds = time.monotonic() - t0
        if state not in ("running", "degraded"):
            raise ContainerError(f"system state {state!r} after boot:\n" + self.console())
        return state

    def close(self, timeout: float = 30) -> None:
        """Halt the container (first SIGTERM), terminate it if that hangs (second), never leak."""
        proc = self.nspawn
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _log("container did not halt in time: terminating it")
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)  # its own session: only ours
                    proc.wait(timeout=10)
        self.nspawn = None
        # nspawn --keep-unit without a host systemd leaves its empty 'payload' cgroups behind
        for top in _payload_cgroup_dirs():
            if top in self._cgroups_before or not top.exists():
                continue
            for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda w: -len(w[0])):
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)

    def __enter__(self) -> Container:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def console(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.console_log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    # ---- commands -----------------------------------------------------------------------------
    def run(self, cmd: str | list[str], check: bool = True, timeout: float = 60,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command inside the container (its mount, PID, network, ... namespaces)."""
        argv = shlex.split(cmd) if isinstance(cmd, str) else cmd
        res = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-a", "env", "-i", *INNER_ENV, *argv],
            capture_output=True, text=True, timeout=timeout, input=input,
        )
        if check and res.returncode != 0:
            raise ContainerError(f"[{self.name}] {' '.join(argv)} -> {res.returncode}\n"
                                 f"{res.stdout}{res.stderr}")
        return res

    def out(self, cmd: str | list[str], timeout: float = 60) -> str:
        return self.run(cmd, timeout=timeout).stdout

    def write(self, path: str, text: str, mode: str = "644") -> None:
        """Write a file inside the container (into its volatile overlay)."""
        self.run(["sh", "-c", f'mkdir -p "$(dirname "$1")" && cat > "$1" && chmod {mode} "$1"',
                  "write", path], input=text)

    def net_namespace(self) -> str:
        return os.readlink(f"/proc/{self.leader}/ns/net")
