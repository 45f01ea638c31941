"""The run directory is trusted only when it is ours, and what is read back from it only when it is
what tagrouted writes (issue 16: planted files once truncated a root-only file, deleted the main
table's routes and "restored" disable_ipv6=1).

Runs without root: the owner the checks demand is this test's own uid (tagrouted demands root).
"""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import pytest

from tagrouted.kernel.converge import Brand, Refused, RoutingRecord
from tagrouted.kernel.rundir import NoRunDir, RunDir, RunDirError, open_run_dir
from tagrouted.kernel.sysctl import SavedSysctls, original_problem

ME = os.geteuid()


def rundir(path: Path, **kw: object) -> RunDir:
    return RunDir(str(path), owner=ME, **kw)  # type: ignore[arg-type]


@pytest.fixture
def base(tmp_path: Path) -> Path:
    tmp_path.chmod(0o700)
    return tmp_path


# ---- the directory -------------------------------------------------------------------------

def test_missing_components_are_created_0700_whatever_the_umask(base: Path) -> None:
    old = os.umask(0)
    try:
        rundir(base / "a" / "b" / "run").close()
    finally:
        os.umask(old)
    for p in (base / "a", base / "a" / "b", base / "a" / "b" / "run"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o700, p


def test_an_existing_run_dir_must_be_0700(base: Path) -> None:
    run = base / "run"
    run.mkdir(mode=0o755)
    run.chmod(0o755)
    with pytest.raises(RunDirError, match=r"mode 0700, this one is owned by uid \d+ with mode 0755"):
        rundir(run)
    run.chmod(0o700)
    rundir(run).close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the directory away")
def test_a_run_dir_owned_by_another_user_is_refused(base: Path) -> None:
    run = base / "run"
    run.mkdir(mode=0o700)
    os.chown(run, 65534, 65534)
    with pytest.raises(RunDirError, match="owned by uid 65534"):
        RunDir(str(run))


def test_a_symlinked_run_dir_is_refused(base: Path) -> None:
    real = base / "real"
    real.mkdir(mode=0o700)
    (base / "run").symlink_to(real)
    with pytest.raises(RunDirError, match="is a symlink"):
        rundir(base / "run")


def test_an_ancestor_others_may_write_is_refused(base: Path) -> None:
    shared = base / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(RunDirError, match="writable by others without the sticky bit"):
        rundir(shared / "run")
    shared.chmod(0o1777)  # like /tmp: others cannot rename what is not theirs
    rundir(shared / "run").close()


def test_a_symlinked_ancestor_is_resolved(base: Path) -> None:
    real = base / "real"
    real.mkdir(mode=0o755)
    (base / "var").symlink_to(real)  # /var/run -> /run
    with rundir(base / "var" / "run") as d:
        assert d.write("x", b"1") is None
    assert (real / "run" / "x").read_bytes() == b"1"


def test_without_create_a_missing_dir_is_said_so(base: Path) -> None:
    with pytest.raises(NoRunDir):
        open_run_dir(str(base / "nope"), create=False, owner=ME)
    assert not (base / "nope").exists()


# ---- files in it ---------------------------------------------------------------------------

def test_reads_refuse_symlinks_fifos_and_endless_files(base: Path) -> None:
    d = rundir(base / "run")
    run = base / "run"
    assert d.read("absent") is None
    (run / "zero").symlink_to("/dev/zero")
    with pytest.raises(RunDirError, match="is a symlink"):
        d.read("zero")
    os.mkfifo(run / "fifo")
    done = threading.Event()

    def read_fifo() -> None:
        with pytest.raises(RunDirError, match="not a regular file"):
            d.read("fifo")
        done.set()

    t = threading.Thread(target=read_fifo, daemon=True)
    t.start()
    t.join(10)
    assert done.is_set(), "reading a FIFO must not wait for a writer"
    (run / "big").write_bytes(b"x" * 101)
    with pytest.raises(RunDirError, match="larger than 100 bytes"):
        d.read("big", limit=100)
    assert d.read("big", limit=101) == b"x" * 101


def test_writes_never_follow_a_planted_symlink(base: Path) -> None:
    """`tables.json.tmp -> /a/root/file` once made apply truncate that file."""
    d = rundir(base / "run")
    run = base / "run"
    victim = base / "victim"
    victim.write_text("precious")
    (run / "tables.json.tmp").symlink_to(victim)
    (run / "tables.json").symlink_to(victim)
    d.write("tables.json", b"[42]")
    assert victim.read_text() == "precious"
    assert not (run / "tables.json").is_symlink() and (run / "tables.json").read_bytes() == b"[42]"
    assert stat.S_IMODE((run / "tables.json").stat().st_mode) == 0o600
    assert sorted(p.name for p in run.iterdir()) == ["tables.json", "tables.json.tmp"]


def test_a_planted_lock_symlink_never_gets_our_pid(base: Path) -> None:
    d = rundir(base / "run")
    victim = base / "victim"
    victim.write_text("precious")
    (base / "run" / "tagrouted.lock").symlink_to(victim)
    with pytest.raises(RunDirError, match="is a symlink"):
        d.open_lock("tagrouted.lock")
    assert victim.read_text() == "precious"


# ---- the routing record --------------------------------------------------------------------

def record(base: Path, content: object) -> RoutingRecord:
    d = rundir(base / "run")
    (base / "run" / "tables.json").write_text(content if isinstance(content, str) else json.dumps(content))
    return RoutingRecord(d)


@pytest.mark.parametrize(("content", "why"), [
    ([254], "main"), ([255], "local"), ([253], "default"), ([0], "not in 1..4294967295"),
    ([2 ** 32], "not in"), (["42"], "not in"), ([True], "not in"), ([42.0], "not in"),
    ({"tables": [42]}, "expected"), ({"tables": [42], "rules": [{"priority": 1042, "mark": 42}]}, "a rule is"),
    ({"tables": [], "rules": [{"priority": 32766, "mark": 42, "table": 42}]}, "priority 32766"),
    ({"tables": [], "rules": [{"priority": 1042, "mark": 0, "table": 42}]}, "mark 0"),
    ({"tables": [], "rules": [{"priority": 1042, "mark": 42, "table": 254}]}, "main"),
    ("[" * 60_000, "not a record"), ("not json", "not a record"), ("", "not a record"),
    (list(range(1, 2000)), "short lists"),
])
def test_a_record_tagrouted_did_not_write_is_refused(base: Path, content: object, why: str) -> None:
    with pytest.raises(Refused, match="is not a record tagrouted wrote") as info:
        record(base, content).read()
    assert why in str(info.value)


def test_an_endless_record_is_refused(base: Path) -> None:
    r = record(base, "")
    (base / "run" / "tables.json").unlink()
    (base / "run" / "tables.json").symlink_to("/dev/zero")
    with pytest.raises(Refused, match="is a symlink"):
        r.read()
    (base / "run" / "tables.json").unlink()
    (base / "run" / "tables.json").write_text("[" + "42, " * 30_000 + "42]")
    with pytest.raises(Refused, match="larger than"):
        r.read()


def test_the_record_reads_back_what_it_wrote_and_the_old_list_form(base: Path) -> None:
    assert record(base, [42, 43]).read() == (frozenset({42, 43}), frozenset())
    r = record(base, {"tables": [], "rules": []})
    brands = frozenset({Brand(1042, 42, 42), Brand(1043, 0x2a, 100)})
    r.write(frozenset({42, 100}), brands)
    assert r.read() == (frozenset({42, 100}), brands)


# ---- the saved sysctls ---------------------------------------------------------------------

@pytest.mark.parametrize(("key", "value", "why"), [
    ("net.ipv6.conf.all.disable_ipv6", "1", "not a sysctl tagrouted changes"),
    ("net.ipv4.conf.eth0.forwarding", "1", "not a sysctl tagrouted changes"),
    ("kernel.core_pattern", "|/tmp/x", "not a sysctl tagrouted changes"),
    ("net.ipv4.ip_forward", "7", "not a value it takes"),
    ("net.ipv4.conf.tun+.rp_filter", "1", "wildcard"),
    ("net.ipv4.conf.all.rp_filter", "1", "reserved"),
    ("net.ipv6.conf.../../x.accept_ra", "1", "interface name"),
])
def test_originals_tagrouted_never_saves_are_refused(key: str, value: str, why: str) -> None:
    assert why in (original_problem(key, value) or "")


@pytest.mark.parametrize(("key", "value"), [
    ("net.ipv4.ip_forward", "0"), ("net.ipv6.conf.all.forwarding", "0"),
    ("net.ipv4.conf.tun0.rp_filter", "1"), ("net.ipv4.conf.eth0.100.rp_filter", "2"),
    ("net.ipv6.conf.eth0.accept_ra", "1"),
])
def test_originals_tagrouted_saves_are_fine(key: str, value: str) -> None:
    assert original_problem(key, value) is None


def test_a_planted_original_is_never_restored(base: Path) -> None:
    d = rundir(base / "run")
    (base / "run" / "sysctl-originals.json").write_text(json.dumps({
        "net.ipv4.ip_forward": "0", "net.ipv6.conf.all.disable_ipv6": "1"}))
    with pytest.raises(ValueError, match=r"disable_ipv6.*not a sysctl tagrouted changes.*none of it is restored"):
        SavedSysctls(d).originals()
