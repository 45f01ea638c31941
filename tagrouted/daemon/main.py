"""`tagrouted`: the daemon in the foreground (systemd Type=notify).

Owns the process: arguments, logging set-up, the run directory and its lock, signal handling
and the exit status. Everything heavy is imported lazily, so `tagrouted --help` is quick and a
bad config is refused (exit 1, nothing applied) before any kernel library loads.

Signals are blocked in every thread (the mask is set before any thread starts) and taken
synchronously by the main thread with sigtimedwait: SIGHUP reloads, SIGTERM/SIGINT stop
(applying on_stop), SIGUSR2 stops the watchdog pings when TAGROUTED_TEST_FAULTS=1 (a test-only
switch proving that systemd restarts a hung daemon). The main thread also checks that the
reconcile worker is alive; if it ever dies, the daemon exits 1 and systemd restarts it.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import signal
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..kernel.rundir import RunDir

DEFAULT_RUN_DIR = "/run/tagrouted"
LOCK_NAME = "tagrouted.lock"
SIGNALS = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGUSR2}


def _parser() -> argparse.ArgumentParser:
    from .. import __version__

    p = argparse.ArgumentParser(
        prog="tagrouted",
        description="Keep tagged policy routing, its iptables chains and sysctls in place "
                    "(runs in the foreground; SIGHUP reloads, SIGTERM stops).")
    p.add_argument("--config", default="/etc/tagrouted/tagrouted.yaml", help="config file (%(default)s)")
    p.add_argument("--run-dir", default=DEFAULT_RUN_DIR,
                   help="run directory: control socket, saved sysctls (%(default)s)")
    p.add_argument("--log-level", default="info", type=str.lower,
                   choices=["debug", "info", "warning", "error"], help="least important record logged")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def _lock_run_dir(run_dir: RunDir) -> int | None:
    """An flock held for the process life: one daemon per run directory. None if taken."""
    fd = run_dir.open_lock(LOCK_NAME)  # O_NOFOLLOW: a planted symlink never receives our pid
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _holder(run_dir: RunDir) -> str:
    with contextlib.suppress(OSError, ValueError):
        return f" (pid {int((run_dir.read(LOCK_NAME, 64) or b'').strip())})"
    return ""


def run_dir_held(run_dir: str) -> str | None:
    """" (pid N)" when a daemon holds the run directory's lock (its socket may not answer yet,
    or no longer, while it starts or stops); None when nobody does."""
    try:
        fd = os.open(os.path.join(run_dir, LOCK_NAME), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        with contextlib.suppress(OSError, ValueError):
            return f" (pid {int(os.read(fd, 64).strip())})"
        return ""
    except OSError:
        return None
    finally:
        os.close(fd)  # also drops our shared lock
    return None


def _cap_malloc_arenas() -> None:
    """glibc gives each thread its own malloc arena: RSS crept ~5 MB over 2000 tunnel flaps.
    One arena serves our few, mostly idle threads (as MALLOC_ARENA_MAX=1; an env value wins)."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(-8, 1)  # M_ARENA_MAX


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import logging

    from .journal import Notifier, setup_logging

    setup_logging(args.log_level)
    log = logging.getLogger("tagrouted")
    from ..core.config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as e:
        for problem in e.problems:
            log.error("%s", problem)
        log.error("%s is invalid: nothing applied", args.config)
        return 1
    run_dir = os.path.abspath(args.run_dir)
    from ..kernel.rundir import RunDir, RunDirError

    try:
        checked = RunDir(run_dir)  # root's, 0700, no symlinks: else nothing is applied
        lock_fd = _lock_run_dir(checked)
    except RunDirError as e:
        log.error("run directory refused: %s", e)
        return 1
    except OSError as e:
        log.error("cannot create the run directory %s: %s", run_dir, e.strerror)
        return 1
    if lock_fd is None:
        log.error("another tagrouted runs with the run directory %s%s", run_dir, _holder(checked))
        return 1

    _cap_malloc_arenas()
    # Before any thread exists: every thread inherits the mask, only sigtimedwait sees these.
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    from .control import AlreadyRunning
    from .scheduler import Daemon

    notifier = Notifier()
    test_faults = os.environ.get("TAGROUTED_TEST_FAULTS") == "1"
    daemon = Daemon(config, os.path.abspath(args.config), run_dir, notifier, test_faults=test_faults)
    log.info("tagrouted starting: config %s, run directory %s, roles %s, %d services, firewall "
             "backend %s", args.config, run_dir, ", ".join(config.roles), len(config.services),
             daemon.firewall.backend)
    try:
        daemon.start()
    except AlreadyRunning as e:
        log.error("%s", e)
        return 1
    except OSError as e:
        log.error("cannot start: %s", e)
        daemon.stop(timeout=5)
        return 1

    code = 0
    while True:
        info = signal.sigtimedwait(SIGNALS, 1.0)
        if info is None:
            if not daemon.worker_alive():
                log.critical("the reconcile worker has died: exiting for a restart")
                code = 1
                break
            continue
        if info.si_signo == signal.SIGHUP:
            daemon.reload_from_signal()
        elif info.si_signo == signal.SIGUSR2:
            daemon.fault_stop_watchdog()
        else:
            log.info("%s: stopping", signal.Signals(info.si_signo).name)
            break
    code = daemon.stop() or code
    notifier.close()
    os.close(lock_fd)
    checked.close()
    return code


if __name__ == "__main__":
    sys.exit(main())
