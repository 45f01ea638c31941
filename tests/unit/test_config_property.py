"""Property (Hypothesis): every mutation of an example config is either a valid file with a working
plan (exit 0), or refused with only `FILE:LINE: key: message` lines (exit 1). Never a traceback,
never a plan that names something iptables, nft or the kernel would read with another meaning.

Mutations: a value replaced (by values that once slipped through, issue 16, or generated ones),
a line deleted, duplicated, swapped or cut, text inserted. Bounded in time: derandomized (the
same examples every run, so CI cannot flake), no example database, TAGROUTED_PROPERTY_EXAMPLES
examples (400 by default, a few seconds); raise it and set TAGROUTED_PROPERTY_RANDOM=1 locally
to search harder.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import re
import shlex
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tagrouted import cli
from tagrouted.core.config import interface_name_problem

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = {p.name: p.read_text() for p in sorted((REPO / "etc" / "tagrouted" / "examples").glob("*.yaml"))}
EXAMPLES_RUN = int(os.environ.get("TAGROUTED_PROPERTY_EXAMPLES", "400"))
RANDOM = os.environ.get("TAGROUTED_PROPERTY_RANDOM") == "1"  # explore beyond CI's fixed examples

# Values that once changed meaning downstream, crashed or hung (issue 16), and their neighbours.
NASTY = [
    '"!eth0"', "tun+", '"tun*"', "tunà", "ééééééé", "'eth0\"'", "all", "default", "lo", '"."', '".."',
    "eth%d", '"a b"', '"tun0\\n"', '"\\e[31m"', "averyverylongname",
    "0x" + "f" * 80, "9" * 80, "4294967296", "-1", "0", "1", "65535", "65536", "1e400", ".nan", ".inf",
    "0b" + "1" * 70, "1:2:3:4:5:6:7:8",
    '"::ffff:127.0.0.1"', "0.1.2.3", "240.0.0.1", '"fe80::1"', "169.254.1.1", '"::1.2.3.4"', "127.0.0.1",
    "255.255.255.255", '"ff02::1"', "0.0.0.0/1", "128.0.0.0/1", "192.0.2.0/24", '"::/0"', "224.0.0.0/4",
    "46", "10", "48", "42", "51820", "0xca6c", "0x80000", "32765", "32766", "52", "254",
    "[", "{", "]", "~", "true", "off", "null", "&a x", "*a", "<<: {}", "!!binary aGk=", "2024-01-01",
    "[" * 40, '"' + "x" * 200 + '"', "tun0", "eth0", "192.168.100.3", '"fd00:100::3"', "443", '"1000-1010"',
]
_VALUE = re.compile(r"(?P<lead>:\s+|-\s+|\[|,\s*)(?P<value>[^,\[\]{}#\n:][^,\[\]{}#\n]*?)(?=\s*(?:,|\]|\}|#|$))")


def _generated_values() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(NASTY),
        st.integers(min_value=-(2 ** 40), max_value=2 ** 40).map(str),
        st.ip_addresses().map(lambda a: f'"{a}"'),
        st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
          .map(lambda t: '"' + t.replace("\\", "\\\\").replace('"', '\\"') + '"'),
        st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-+!*@%", min_size=1, max_size=18),
    )


@st.composite
def mutated_configs(draw: st.DrawFn) -> str:
    text = draw(st.sampled_from(sorted(EXAMPLES.values())))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        lines = text.splitlines()
        if not lines:
            break
        kind = draw(st.sampled_from(["value", "value", "value", "delete", "duplicate", "swap", "cut",
                                     "insert"]))
        i = draw(st.integers(min_value=0, max_value=len(lines) - 1))
        if kind == "value":
            spots = list(_VALUE.finditer(lines[i]))
            if spots:
                m = draw(st.sampled_from(spots))
                new = draw(_generated_values())
                lines[i] = lines[i][:m.start("value")] + new + lines[i][m.end("value"):]
        elif kind == "delete":
            del lines[i]
        elif kind == "duplicate":
            lines.insert(i, lines[i])
        elif kind == "swap":
            j = draw(st.integers(min_value=0, max_value=len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif kind == "cut":
            lines[i] = lines[i][:draw(st.integers(min_value=0, max_value=len(lines[i])))]
        else:
            lines.insert(i, draw(st.sampled_from(["  - {name: x, proto: tcp, port: 1, address: 192.168.100.9}",
                                                  "tag: {dscp: 46}", "on_stop: remove", "bogus: 1",
                                                  "\tkey: tab", "---", "roles: [gateway]"])))
        text = "\n".join(lines) + "\n"
    return text


def run(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(args))
    return code, out.getvalue(), err.getvalue()


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def plan_is_literal(lines: list[str]) -> None:
    """What iptables, nft, ip and sysctl(8) read from the plan is what the config meant."""
    for line in lines:
        assert not _CONTROL.search(line), line
        if line.startswith("#"):
            continue
        words = shlex.split(line)
        for flag, value in itertools.pairwise(words):
            if flag in ("-i", "-o", "dev", "iifname", "oifname"):  # iptables, ip, nft
                assert interface_name_problem(value) is None, line
        if words[:2] == ["sysctl", "-w"]:
            key, _, value = words[2].partition("=")
            assert re.fullmatch(r"net\.ipv[46]\.[a-z_]+(\.[A-Za-z0-9_@/-]+)?\.[a-z_]+", key) or \
                key == "net.ipv4.ip_forward", line
            assert value.isdigit(), line


@settings(max_examples=EXAMPLES_RUN, deadline=None, derandomize=not RANDOM, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mutated_configs())
def test_every_mutated_example_is_valid_with_a_plan_or_refused_line_by_line(text: str) -> None:
    fd, path = tempfile.mkstemp(prefix="tagrouted-prop-", suffix=".yaml")
    try:
        os.write(fd, text.encode())
        os.close(fd)
        code, out, err = run("--config", path, "check")
        assert code in (0, 1), (code, err)
        pcode, pout, perr = run("--config", path, "plan")
        assert pcode == code, (code, pcode, perr)
        if code == 0:
            assert out.startswith(f"{path}: valid") and err == ""
            lines = pout.splitlines()
            assert lines and lines[0].startswith("# tagrouted plan for"), pout
            plan_is_literal(lines)
        else:
            assert out == "" and err, text
            line = re.compile(re.escape(path) + r":[1-9]\d*: [^:\n]+: [^\n]+")
            for problem in err.splitlines():
                assert line.fullmatch(problem), problem
                assert not _CONTROL.search(problem), problem
            assert perr == err
    finally:
        os.unlink(path)
