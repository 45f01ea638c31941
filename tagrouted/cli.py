"""`tagroutectl`: check, plan, diff, apply, status, reload, down, doctor, completion.

Owns argument parsing, exit codes and what the user reads. Imports lazily: `check` and `plan`
load only the config and the pure core, `status` and `reload` only the control-socket client,
so they start fast; only `diff` and `doctor` import the kernel libraries, and `apply` and `down` only
when no daemon runs.

One owner of the kernel state: while a daemon answers on the run directory's control socket,
`apply` asks it to reload and converge, and `down` asks it to remove everything and hold it
down until a reload; they never write the kernel beside it. Only when nobody listens there (no
socket, a stale one, and nobody holds the run directory's lock) do they do the work themselves.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .core.config import Config

EXIT_OK, EXIT_INVALID, EXIT_DRIFT, EXIT_NO_DAEMON = 0, 1, 2, 3
DEFAULT_RUN_DIR = "/run/tagrouted"
NOTHING_BUT_BLOCKED = ("nothing to change, but NOT in sync: another firewall blocks our traffic "
                       "(blocked: above)")
# Kept equal to config.DEFAULT_CONFIG_PATH (a unit test checks): `status` must not pay for
# importing the config module and PyYAML.
DEFAULT_CONFIG_PATH = "/etc/tagrouted/tagrouted.yaml"


def _parser(shtab: Any = None) -> argparse.ArgumentParser:
    """The command line; with the shtab module, its options carry their completion hints."""
    from . import __version__

    p = argparse.ArgumentParser(prog="tagroutectl", description="Drive and inspect tagrouted.")
    # No default here: `apply` must know whether the user named a file (main() fills it in).
    config = p.add_argument("--config", help=f"config file ({DEFAULT_CONFIG_PATH})")
    run_dir = p.add_argument("--run-dir", default=DEFAULT_RUN_DIR, help="run directory (%(default)s)")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    if shtab is not None:
        config.complete = shtab.FILE  # type: ignore[attr-defined]
        run_dir.complete = shtab.DIRECTORY  # type: ignore[attr-defined]
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("check", help="validate the config (exit 0 valid, 1 invalid)")
    sub.add_parser("plan", help="print this host's desired state as ip / iptables-save lines")
    sub.add_parser("diff", help="desired vs the kernel now (exit 0 in sync, 2 drift)")
    sub.add_parser("apply", help="converge once (a running daemon re-reads the config and does it)")
    status = sub.add_parser("status", help="ask the daemon how it is (exit 3: no daemon)")
    status.add_argument("--json", action="store_true", help="machine-readable")
    sub.add_parser("reload", help="make the daemon re-read the config")
    sub.add_parser("down", help="remove everything tagrouted owns, restore sysctls (a running daemon "
                                "does it and holds it down until reload; exit 1: a part failed)")
    completion = sub.add_parser("completion", help="print the bash or zsh completion script")
    completion.add_argument("shell", choices=("bash", "zsh"))
    doctor = sub.add_parser("doctor", help="check this host's part of the path; changes nothing "
                                           "(exit 0 ok, 2 a check fails, 1 invalid config)")
    doctor.add_argument("--json", action="store_true", help="machine-readable")
    return p


def _load(path: str) -> Config | None:
    """The config, or None after printing every problem as FILE:LINE: key: what is wrong."""
    from .core.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return None


def cmd_check(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_INVALID
    paths = f"; {len(config.paths)} paths ({', '.join(p.name for p in config.paths)})" if config.paths else ""
    print(f"{args.config}: valid (roles: {', '.join(config.roles)}; {len(config.services)} services{paths})")
    return EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    from .core.desired import assumed_facts, desired_state
    from .core.plan import path_lines, plan_lines
    from .kernel.firewall import choose

    config = _load(args.config)
    if config is None:
        return EXIT_INVALID
    facts = assumed_facts(config)
    state = desired_state(config, facts)
    choice = choose(config.firewall.backend)
    print(f"# tagrouted plan for {args.config} (roles: {', '.join(config.roles)})")
    print(f"# firewall backend: {choice.backend} ({choice.why})")
    print(f"# assuming these interfaces are present: {', '.join(link.name for link in facts.links)}")
    for line in path_lines(config):
        print(line)
    for note in state.notes:
        print(f"# note: {note}")
    for line in plan_lines(state, choice.backend):
        print(line)
    return EXIT_OK


def _legacy_notice(config: Config) -> None:
    from .kernel.firewall import IPTABLES_LEGACY, choose, iptables_variant

    if choose(config.firewall.backend).backend == IPTABLES_LEGACY and iptables_variant() == "nf_tables":
        print("note: this host's `iptables` is the nf_tables variant; with firewall.backend "
              "iptables-legacy tagrouted's rules live in the legacy tables: see them with "
              "iptables-legacy-save / ip6tables-legacy-save", file=sys.stderr)


def _converger(run_dir: str) -> object | None:
    """A Converger on `run_dir`, or None after saying why the run directory is refused."""
    from .kernel.converge import Converger
    from .kernel.rundir import RunDirError

    try:
        return Converger(run_dir)
    except RunDirError as e:
        print(f"error: run directory refused: {e}", file=sys.stderr)
        return None


def cmd_diff(args: argparse.Namespace) -> int:
    from .kernel.converge import Converger, drift_lines

    config = _load(args.config)
    if config is None:
        return EXIT_INVALID
    converger = _converger(args.run_dir)
    if not isinstance(converger, Converger):
        return EXIT_INVALID
    with converger:
        lines = drift_lines(converger, config)
    drift = False
    for line in lines:
        if line.startswith("!"):  # what stops the comparison itself (a refused routing table)
            print(f"error: {line[1:]}", file=sys.stderr)
            drift = True
        elif line.startswith("# "):  # what may block our traffic: a warning, not drift
            print(f"warning: {line[2:]}", file=sys.stderr)
        else:
            print(line)
            drift = True  # a `blocked:` conflict is drift too
    return EXIT_DRIFT if drift else EXIT_OK


def _report(result: object) -> int:
    from .kernel.converge import ConvergeResult

    assert isinstance(result, ConvergeResult)
    for change in result.changes:
        print(change.message)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    for error in result.errors:
        print(f"error: {error}", file=sys.stderr)
    for c in result.conflicts or ():
        label = "blocked" if c.severity == "fail" else "may block"
        print(f"{label}: {c.line()}", file=sys.stderr)
    if not result.changes and result.ok:
        blocked = any(c.severity == "fail" for c in result.conflicts or ())
        print(NOTHING_BUT_BLOCKED if blocked else "in sync: nothing to change")
    return EXIT_OK if result.ok else EXIT_INVALID


def _daemon_does(args: argparse.Namespace, payload: dict[str, Any]) -> dict[str, Any] | int | None:
    """The running daemon's reply to `payload`; None when no daemon runs on the run directory
    (the caller does the work itself); an exit status, after saying why, when a daemon is there
    but cannot do it: then nothing is written beside it."""
    from .daemon.control import NoDaemon, NotListening, Refused, request
    from .daemon.main import run_dir_held

    try:
        return request(args.run_dir, payload, timeout=60)
    except NotListening as e:
        holder = run_dir_held(args.run_dir)
        if holder is None:
            return None
        print(f"tagrouted{holder} holds {args.run_dir} but does not answer ({e}): it is starting or "
              "stopping. Nothing done; try again in a moment", file=sys.stderr)
    except Refused as e:
        print(str(e), file=sys.stderr)
    except NoDaemon as e:
        print(f"tagrouted does not answer: {e}. Nothing done beside it", file=sys.stderr)
    return EXIT_INVALID


def cmd_apply(args: argparse.Namespace) -> int:
    payload: dict[str, Any] = {"command": "apply"}
    if args.config_given:
        payload["config"] = os.path.abspath(args.config)
    reply = _daemon_does(args, payload)
    if isinstance(reply, int):
        return reply
    if reply is not None:
        return _daemon_applied(reply)
    from .kernel.converge import Converger

    config = _load(args.config)
    if config is None:
        return EXIT_INVALID
    _legacy_notice(config)
    converger = _converger(args.run_dir)
    if not isinstance(converger, Converger):
        return EXIT_INVALID
    with converger:
        return _report(converger.converge(config))


def _daemon_applied(reply: dict[str, Any]) -> int:
    pid = reply.get("pid", "?")
    if not reply.get("ok"):
        for line in reply.get("errors", []):
            print(line, file=sys.stderr)
        print(f"apply rejected: tagrouted (pid {pid}) keeps running its last good config", file=sys.stderr)
        return EXIT_INVALID
    print(f"note: applied by the running tagrouted (pid {pid}), which keeps it in place", file=sys.stderr)
    changes, errors = reply.get("changes", []), reply.get("apply_errors", [])
    for line in changes:
        print(line)
    for line in reply.get("notes", []):
        print(f"note: {line}", file=sys.stderr)
    for line in errors:
        print(f"error (the daemon retries): {line}", file=sys.stderr)
    for line in reply.get("blocked", []):  # another firewall stops our traffic: the fix is theirs
        print(line, file=sys.stderr)
    if not changes and not errors:
        blocked = any(line.startswith("blocked:") for line in reply.get("blocked", []))
        print(NOTHING_BUT_BLOCKED if blocked else "in sync: nothing to change")
    return EXIT_INVALID if errors else EXIT_OK


def _daemon_held_down(reply: dict[str, Any]) -> int:
    for line in reply.get("errors", []):  # e.g. the daemon is stopping
        print(line, file=sys.stderr)
    if not reply.get("ok"):
        return EXIT_INVALID
    changes = reply.get("changes", [])
    for line in changes:
        print(line)
    for line in reply.get("apply_errors", []):
        print(f"error: {line}", file=sys.stderr)
    if not changes:
        print("nothing to remove")
    print(f"held down: tagrouted (pid {reply.get('pid', '?')}) keeps everything removed until "
          "`tagroutectl apply`, `tagroutectl reload`, SIGHUP or a restart")
    return EXIT_OK


def cmd_down(args: argparse.Namespace) -> int:
    """Remove what the run directory records plus our brands; non-zero when anything failed."""
    reply = _daemon_does(args, {"command": "down"})
    if isinstance(reply, int):
        return reply
    if reply is not None:
        return _daemon_held_down(reply)
    from .core.config import ConfigError, Tag, load_config
    from .kernel.converge import Converger

    paths = None
    try:
        config = load_config(args.config)
        tag, paths = config.tag, config.tag_paths()  # every path's brand, beyond the recorded ones
    except (ConfigError, OSError, ValueError):
        tag = Tag()  # a broken or missing file must not keep `down` from cleaning up
    converger = _converger(args.run_dir)
    if not isinstance(converger, Converger):
        return EXIT_INVALID
    with converger:
        return _report(converger.converge(None, tag, paths=paths))


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from .daemon.control import NoDaemon, Untrusted, request

    try:
        reply = request(args.run_dir, {"command": "status"})
    except NoDaemon as e:
        _no_daemon(e)
        return EXIT_NO_DAEMON
    except Untrusted as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INVALID
    if not isinstance(reply.get("status"), dict):
        print("error: the daemon's answer holds no status", file=sys.stderr)
        return EXIT_INVALID
    if args.json:
        print(json.dumps(reply["status"], indent=2, sort_keys=True))
    else:
        from .daemon.control import format_status

        print(format_status(reply["status"]))
    return EXIT_OK


def cmd_reload(args: argparse.Namespace) -> int:
    from .daemon.control import NoDaemon, Untrusted, request

    try:
        reply = request(args.run_dir, {"command": "reload"}, timeout=60)
    except NoDaemon as e:
        _no_daemon(e)
        return EXIT_NO_DAEMON
    except Untrusted as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INVALID
    if reply.get("ok"):
        for line in reply.get("changes", []):
            print(line)
        # The file was accepted; what could not be applied yet is retried by the daemon.
        for line in reply.get("apply_errors", []):
            print(f"error (retrying): {line}", file=sys.stderr)
        print("reloaded")
        return EXIT_OK
    for line in reply.get("errors", []):
        print(line, file=sys.stderr)
    print("reload rejected: the running state is kept", file=sys.stderr)
    return EXIT_INVALID


def cmd_completion(args: argparse.Namespace) -> int:
    import shtab

    print(shtab.complete(_parser(shtab), shell=args.shell))
    return EXIT_OK


def _no_daemon(e: Exception) -> None:
    from .daemon.control import Refused

    if isinstance(e, Refused):
        print(f"tagrouted refused the request: {e}", file=sys.stderr)
    else:
        print(f"tagrouted is not running: {e}", file=sys.stderr)


def cmd_doctor(args: argparse.Namespace) -> int:
    from . import doctor

    config = _load(args.config)
    if config is None:
        return EXIT_INVALID
    checks = doctor.run(config, args.run_dir)
    print(doctor.render(checks, args.json))
    return doctor.exit_code(checks)


COMMANDS = {
    "check": cmd_check,
    "plan": cmd_plan,
    "diff": cmd_diff,
    "apply": cmd_apply,
    "status": cmd_status,
    "reload": cmd_reload,
    "down": cmd_down,
    "doctor": cmd_doctor,
    "completion": cmd_completion,
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.config_given = args.config is not None
    if args.config is None:
        args.config = DEFAULT_CONFIG_PATH
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
