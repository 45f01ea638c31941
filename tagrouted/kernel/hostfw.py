"""The host's own firewall: read all of it, keep our accepts in its iptables-style FORWARD
chains, and hand the judgement (core/hostfw.py) what it needs.

Owns: in each iptables-style filter table the forward path runs through (iptables-nft's
`ip filter` / `ip6 filter` with a FORWARD chain; the legacy filter table where it exists and
the legacy backend is not in use), the chain TAGROUTED-HOSTFW and the one rule
`-m comment --comment tagrouted -j TAGROUTED-HOSTFW`, first in DOCKER-USER when that chain
exists, else first in FORWARD. Never touches anything else there (other rules, chains,
policies), and never edits another tool's native nft table: a drop there is reported.

Reads: every nft table but ours through libnftables, table by table (JSON, plus the text with
handles to name rules); the tables iptables-nft owns through `iptables-nft-save` (their matches
are opaque `xt` blobs in JSON); the legacy filter and mangle tables through libiptc (only where the namespace
has them: opening one creates it).
Writes: iptables-nft tables only through iptables-nft-restore --noflush (one batch per family:
one nf_tables transaction, refused whole when the table moved under it; the next pass re-reads),
never through libnftables (iptables-nft keeps its own metadata in the rules); legacy tables
through the legacy backend's libiptc code (one commit under /run/xtables.lock).
Restore within a second: iptables-nft changes (Docker restart, ufw reload, iptables -F) are
nf_tables transactions, announced by events that poke a pass (daemon/scheduler.py); legacy
tables announce nothing: the resync timer re-reads them.

Threading: one HostFirewall per Converger, used from its thread; its libnftables context binds
to the network namespace it was created in.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any

from ..core.hostfw import (
    HOSTFW_CHAIN,
    Conflict,
    HostfwPlace,
    Ruleset,
    hostfw_in_sync,
    hostfw_places,
    hostfw_rules,
    is_iptables_nft,
    judge,
    jump_rule,
    nft_texts,
    parse_nft,
    parse_save,
    parse_save_view,
    restore_batch,
    with_integration,
)
from ..core.nft_rules import TABLE_FAMILY, TABLE_NAME
from ..core.state import Change, Family, FirewallIntent, FirewallRule
from .netlink import nft_table_names

log = logging.getLogger("tagrouted.hostfw")

LEGACY_TABLES = ("filter", "mangle")
TIMEOUT = 10.0
WRITE_ROUNDS = 3  # read-write rounds per pass while other tools keep changing the tables
_NAMES = {4: "/proc/net/ip_tables_names", 6: "/proc/net/ip6_tables_names"}


def legacy_tables(family: int) -> set[str]:
    """The legacy tables this namespace has instantiated."""
    try:
        with open(_NAMES[family]) as f:
            return set(f.read().split())
    except OSError:
        return set()


def legacy_present() -> bool:
    return any(legacy_tables(f) & set(LEGACY_TABLES) for f in (4, 6))


def _tool(family: int, what: str) -> str:
    return f"{'iptables' if family == 4 else 'ip6tables'}-nft-{what}"


@dataclass
class Picture:
    """The host's ruleset as read once: the parsed chains, and the save texts of the iptables-nft
    filter tables (what the sync compares our chain against)."""

    ruleset: Ruleset
    nft_filter_save: dict[int, str] = field(default_factory=dict)
    legacy_filter: dict[int, bool] = field(default_factory=dict)


@dataclass
class HostfwResult:
    changes: list[Change] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    conflicts: tuple[Conflict, ...] = ()
    places: list[HostfwPlace] = field(default_factory=list)
    picture: Picture | None = None


class HostFirewall:
    def __init__(self) -> None:
        self._ctx: Any = None
        self._judged: tuple[Any, tuple[Conflict, ...]] | None = None

    @property
    def nft(self) -> Any:
        if self._ctx is None:
            from .firewall.nftables import binding

            ctx = binding().Nftables()
            self._ctx = ctx
        return self._ctx

    def close(self) -> None:
        self._ctx = None

    # ---- reading ---------------------------------------------------------------------------
    def _nft_cmd(self, text: str, *, as_json: bool) -> str:
        ctx = self.nft
        ctx.set_json_output(as_json)
        ctx.set_handle_output(not as_json)
        rc, out, err = ctx.cmd(text)
        if rc != 0:
            raise RuntimeError(f"nft {text}: {(err or '').strip()}")
        return out or ""

    def _foreign_tables(self) -> tuple[dict[str, Any], dict[tuple[str, str, str, int], str]]:
        """Every nft table but ours, as JSON and as text with handles. Table by table: listing the
        whole ruleset would read our own 3000 rules twice a pass (~60 ms at 1000 services, where
        a Docker host's tables take ~1 ms each). The names come from netlink (libnftables' `list
        tables` fetches every rule too); nft 1.0.6 refuses several `list table` in one command."""
        items: list[Any] = []
        texts: dict[tuple[str, str, str, int], str] = {}
        for family, name in nft_table_names():
            if (family, name) == (TABLE_FAMILY, TABLE_NAME):
                continue
            what = f"list table {family} {name}"
            try:
                items += json.loads(self._nft_cmd(what, as_json=True) or "{}").get("nftables", [])
                texts.update(nft_texts(self._nft_cmd(what, as_json=False)))
            except RuntimeError as e:
                if "No such file or directory" not in str(e):
                    raise  # else the table went between the two reads: it holds nothing now
        return {"nftables": items}, texts

    def read(self, *, legacy_mangle: bool = True) -> Picture:
        """Everything the host's firewall holds, as the judgement reads it."""
        problems: list[str] = []
        chains = []
        nft_save: dict[int, str] = {}
        try:
            doc, texts = self._foreign_tables()
        except Exception as e:  # no nf_tables, no binding: judge what else can be read
            doc, texts = {"nftables": []}, {}
            problems.append(f"nft ruleset unreadable: {e}")
        by_table: dict[tuple[str, str], set[str]] = {}
        for item in doc.get("nftables", []):
            c = item.get("chain") if isinstance(item, dict) else None
            if isinstance(c, dict):
                key = (str(c.get("family")), str(c.get("table")))
                by_table.setdefault(key, set()).add(str(c.get("name")))
        ipt_nft = {k for k, names in by_table.items() if is_iptables_nft(k[0], k[1], names)}
        chains += parse_nft(doc, texts, skip=ipt_nft)
        for family, fam in ((4, "ip"), (6, "ip6")):
            if not any(f == fam for f, _ in ipt_nft):
                continue
            try:
                text = self._save(family)
            except Exception as e:
                problems.append(f"{_tool(family, 'save')}: {e}")
                continue
            chains += parse_save(text, "iptables-nft", fam)
            if (fam, "filter") in ipt_nft:
                nft_save[family] = _only_table(text, "filter")
        legacy_filter: dict[int, bool] = {}
        for family, fam in ((4, "ip"), (6, "ip6")):
            present = legacy_tables(family)
            legacy_filter[family] = "filter" in present
            for table in LEGACY_TABLES:
                if table not in present or (table == "mangle" and not legacy_mangle):
                    continue
                try:
                    from .firewall.iptables_legacy import save_text

                    text = save_text(family, table)  # type: ignore[arg-type]
                except Exception as e:
                    problems.append(f"legacy {table} (IPv{family}): {e}")
                    continue
                if text:
                    chains += parse_save(text, "legacy", fam)
        return Picture(Ruleset(tuple(chains), not problems, tuple(problems)), nft_save, legacy_filter)

    @staticmethod
    def _save(family: int) -> str:
        exe = shutil.which(_tool(family, "save"))
        if exe is None:
            raise RuntimeError("not installed (the iptables package)")
        res = subprocess.run([exe], capture_output=True, text=True, timeout=TIMEOUT)
        if res.returncode != 0:
            raise RuntimeError(res.stderr.strip() or f"exit {res.returncode}")
        return res.stdout

    # ---- keeping our accepts ---------------------------------------------------------------
    def sync(self, intent: FirewallIntent, *, mode: str, backend: str, dry_run: bool = False,
             judge_it: bool = True, assume_integrated: bool | None = None) -> HostfwResult:
        """Keep our accepts where they belong (mode integrate; report writes nothing, and an empty
        intent removes them all), then judge the host's ruleset against our traffic. A dry run
        judges the ruleset as the pass would leave it (`diff`), unless `assume_integrated` is
        False (`doctor`: as it is now)."""
        result = HostfwResult()
        rules = hostfw_rules(intent)
        wrote = False
        # Another tool may change the tables between our read and our write (Docker sets both
        # families' policies one after the other): re-read after a write and go again, a few
        # times, so a pass ends with the state it judges.
        for _ in range(WRITE_ROUNDS):
            picture = self.read(legacy_mangle=judge_it)
            places = (hostfw_places(picture.ruleset, intent, backend, picture.legacy_filter)
                      if mode == "integrate" else [])
            result.places = places
            changes = self._sync_places(rules, places, picture, dry_run, result.errors)
            result.changes += changes
            wrote = wrote or bool(changes)
            if dry_run or not changes:
                break
        else:
            picture = self.read(legacy_mangle=judge_it)
        if judge_it and not intent.empty:
            ruleset = picture.ruleset
            if wrote and dry_run and (dry_run if assume_integrated is None else assume_integrated):
                ruleset = with_integration(ruleset, places)  # judged as the pass would leave it
            key = (ruleset, intent, backend)
            if self._judged is None or self._judged[0] != key:
                # ~0.3 s for 1000 services against a firewalld-sized ruleset: a pass that finds
                # the same ruleset (the legacy timer's) reuses the last answer
                self._judged = (key, judge(ruleset, intent, backend))
            result.conflicts = self._judged[1]
        result.picture = picture
        return result

    def _sync_places(self, rules: dict[Family, tuple[FirewallRule, ...]], places: list[HostfwPlace],
                     picture: Picture, dry_run: bool, errors: list[str]) -> list[Change]:
        out: list[Change] = []
        for family in (4, 6):
            want = rules.get(family, ())  # type: ignore[call-overload]
            for source in ("iptables-nft", "legacy"):
                place = next((p for p in places if p.family == family and p.source == source), None)
                mine = want if place else ()
                parent = place.parent if place else "FORWARD"
                try:
                    if source == "iptables-nft":
                        out += self._sync_nft(family, mine, parent, picture, dry_run)
                    else:
                        out += self._sync_legacy(family, mine, parent, picture, dry_run)
                except Exception as e:
                    errors.append(f"host firewall ({source}, IPv{family}): {e}")
        return out

    def _sync_nft(self, family: int, rules: tuple[FirewallRule, ...], parent: str, picture: Picture,
                  dry_run: bool) -> list[Change]:
        text = picture.nft_filter_save.get(family)
        if text is None:
            return []  # no iptables-nft filter table: nothing of ours can be in one
        view = parse_save_view(text)
        if hostfw_in_sync(view, rules, parent):
            return []
        where = f"(filter, IPv{family}, iptables-nft)"
        changes = _changes(view.chain_present, bool(rules), view.comments, rules, view.jumps, parent, where)
        if not dry_run:
            exe = shutil.which(_tool(family, "restore"))
            if exe is None:
                raise RuntimeError(f"{_tool(family, 'restore')} is not installed (the iptables package)")
            batch = "\n".join(restore_batch(view, rules, parent)) + "\n"
            res = subprocess.run([exe, "--noflush", "-w"], input=batch, capture_output=True, text=True,
                                 timeout=TIMEOUT)
            if res.returncode != 0:
                log.debug("refused batch:\n%s", batch)
                raise RuntimeError(f"{_tool(family, 'restore')} refused the batch (the table may have "
                                   f"changed meanwhile; retried): {res.stderr.strip()}")
        return changes

    @staticmethod
    def _sync_legacy(family: int, rules: tuple[FirewallRule, ...], parent: str, picture: Picture,
                     dry_run: bool) -> list[Change]:
        if not picture.legacy_filter.get(family):
            return []
        from .firewall.iptables_legacy import sync_accept_chain

        return sync_accept_chain(family, HOSTFW_CHAIN, rules, parent, jump_rule(),  # type: ignore[arg-type]
                                 dry_run=dry_run)

    def drift_lines(self, intent: FirewallIntent, *, mode: str, backend: str) -> list[str]:
        """`tagroutectl diff`: what the integration would change (+/-), then each conflict
        (`blocked:` for those that surely stop our traffic, `# may block:` for the others)."""
        result = self.sync(intent, mode=mode, backend=backend, dry_run=True)
        lines = [f"+host firewall: {c.message}" if c.action != "removed" else f"-host firewall: {c.message}"
                 for c in result.changes]
        lines += [f"-host firewall: {e}" for e in result.errors]
        lines += [f"blocked: {c.line()}" for c in result.conflicts if c.severity == "fail"]
        lines += [f"# may block: {c.line()}" for c in result.conflicts if c.severity == "warn"]
        return lines


def _only_table(save: str, table: str) -> str:
    out: list[str] = []
    inside = False
    for line in save.splitlines():
        if line.startswith("*"):
            inside = line[1:].strip() == table
        if inside:
            out.append(line)
        if line.strip() == "COMMIT":
            inside = False
    return "\n".join(out) + "\n"


def _changes(present: bool, want: bool, comments: list[str], rules: tuple[FirewallRule, ...],
             jumps: list[tuple[str, int, bool]], parent: str, where: str) -> list[Change]:
    from ..core.hostfw import rule_comment

    out: list[Change] = []
    keep = (parent, 0, True) if want and (parent, 0, True) in jumps else None
    if want and (not present or comments != [rule_comment(r) for r in rules]):
        verb = "added" if not present else "replaced"
        out.append(Change(verb, "chain", f"{verb} chain {HOSTFW_CHAIN} {where}: "  # type: ignore[arg-type]
                                         f"{len(rules)} accepts for our traffic"))
    for chain, pos, _exact in jumps:
        if (chain, pos, _exact) != keep:
            out.append(Change("removed", "jump",
                              f"removed jump {chain} -> {HOSTFW_CHAIN} (rule {pos + 1}) {where}"))
    if want and keep is None:
        out.append(Change("added", "jump", f"added jump {parent} -> {HOSTFW_CHAIN} {where}"))
    if not want and present:
        out.append(Change("removed", "chain", f"removed chain {HOSTFW_CHAIN} {where}"))
    return out
