"""tagroutectl's own surface, without a kernel: --version, the completion scripts a shell loads,
and how `status` shows a daemon held down by `tagroutectl down`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tagrouted import __version__, cli
from tagrouted.daemon.control import format_status

BIN = Path(sys.executable).parent
COMMANDS = sorted(cli.COMMANDS)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tagrouted.cli", *args], capture_output=True, text=True)


def test_version() -> None:
    res = run("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"tagroutectl {__version__}", res
    daemon = subprocess.run([sys.executable, "-c", "import sys; from tagrouted.daemon.main import main; "
                             "sys.exit(main(['--version']))"], capture_output=True, text=True)
    assert daemon.returncode == 0 and daemon.stdout.strip() == f"tagrouted {__version__}", daemon


@pytest.fixture(scope="module")
def bash_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    res = run("completion", "bash")
    assert res.returncode == 0, res.stderr
    path = tmp_path_factory.mktemp("completion") / "tagroutectl"
    path.write_text(res.stdout)
    return path


def test_bash_completion_parses(bash_script: Path) -> None:
    res = subprocess.run(["bash", "-n", str(bash_script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def complete_in_bash(script: Path, words: list[str]) -> list[str]:
    """What bash offers after `words` (the last one being typed), as the TAB key would."""
    code = ('source "$1"; shift; COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); COMP_LINE="$*"; '
            'COMP_POINT=${#COMP_LINE}; f=$(complete -p tagroutectl | sed -E "s/.*-F ([^ ]+).*/\\1/"); '
            '"$f" tagroutectl "${COMP_WORDS[-1]}" "${COMP_WORDS[-2]}"; printf "%s\\n" "${COMPREPLY[@]}"')
    res = subprocess.run(["bash", "-c", code, "bash", str(script), *words], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return sorted(w for w in res.stdout.split("\n") if w)


def test_bash_completes_commands_options_and_files(bash_script: Path, tmp_path: Path) -> None:
    assert complete_in_bash(bash_script, ["tagroutectl", ""]) == COMMANDS
    assert complete_in_bash(bash_script, ["tagroutectl", "re"]) == ["reload"]
    assert complete_in_bash(bash_script, ["tagroutectl", "status", "--j"]) == ["--json"]
    assert complete_in_bash(bash_script, ["tagroutectl", "completion", ""]) == ["bash", "zsh"]
    (tmp_path / "tagrouted.yaml").write_text("roles: [service]\n")
    assert complete_in_bash(bash_script, ["tagroutectl", "--config", f"{tmp_path}/tag"]) == [
        f"{tmp_path}/tagrouted.yaml"]


def test_zsh_completion_parses(tmp_path: Path) -> None:
    res = run("completion", "zsh")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("#compdef tagroutectl\n")  # the file to put on $fpath: _tagroutectl
    for command in COMMANDS:
        assert f"\n    {command}:'" in res.stdout, command
    if shutil.which("zsh") is None:
        pytest.skip("zsh is not installed: the script's syntax is checked with zsh -n where it is")
    path = tmp_path / "_tagroutectl"
    path.write_text(res.stdout)
    check = subprocess.run(["zsh", "-n", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_completion_needs_no_kernel_library() -> None:
    code = ("import sys; from tagrouted import cli; cli.main(['completion', 'bash']); "
            "sys.stderr.write(repr([m for m in ('pyroute2', 'iptc', 'prometheus_client') if m in sys.modules]))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert res.stderr.strip().endswith("[]"), res.stderr


def test_status_says_plainly_that_it_is_held_down() -> None:
    text = format_status({"version": "0.1.0", "pid": 42, "started": 1.0, "roles": ["vpn-client"],
                          "ready": True, "in_sync": False, "held_down": True, "held_down_since": 2.0,
                          "tunnel_interface": "tun0", "tunnel_up": True,
                          "metrics_listen": "127.0.0.1:9542"})
    in_sync = next(line for line in text.splitlines() if line.startswith("in sync:"))
    assert "HELD DOWN by `tagroutectl down`" in in_sync and "yes" not in in_sync, text
    assert "until `tagroutectl apply`, `tagroutectl reload`, SIGHUP or a restart" in text
    assert "metrics:      127.0.0.1:9542 (/metrics)" in text
