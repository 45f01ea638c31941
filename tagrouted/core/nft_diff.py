"""The `inet tagrouted` table we want against the one the kernel has: one transaction, its records.

Pure: the kernel's side arrives as a `KernelNft` the nftables backend read (chains with their
hook, type, priority and policy and each rule's comment; sets and maps with their declared types
and each element's comment; counter names). Nothing here parses rule text: every rule and element
we write carries a comment with the digest of its own text (core/nft_rules.py), so equal comments
in equal order mean equal content, whatever nft version prints the rules.

What one transaction does (knftables/kube-proxy style, in one batch, so no packet sees a half):
- no table: create everything; an empty desired table: delete the table.
- a chain whose rules differ (missing, foreign, reordered): flushed and refilled; a chain whose
  hook, type, priority or policy differs: deleted and re-added; a chain we no longer want: gone.
- a set whose elements differ: the missing ones added when the kernel holds nothing we do not
  want, else flushed and refilled; a set whose declared types differ, or that we no longer want,
  is deleted, which first needs every chain flushed (rules reference sets) and refilled.
- a meter (a dynamic set: the kernel adds its elements, without comments) is compared by its
  declaration only and never flushed: its buckets survive every sync that keeps its limit.
- counters: added when missing, deleted last (after the map elements that referenced them);
  a counter kept keeps its packets and bytes across any reload that keeps its service.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from .nft_rules import (
    WHERE,
    NftChain,
    NftSet,
    NftTable,
    Script,
    add_chain,
    add_elements,
    add_rules,
    add_set,
    creation_script,
)
from .state import Change, Family

# Up to this many element changes in one set get one record each; more make one summary record.
PER_ELEMENT_RECORDS = 20


@dataclass(frozen=True)
class KernelSet:
    kind: str                           # set | map
    key: tuple[str, ...]
    value: tuple[str, ...] | None
    flags: tuple[str, ...]
    comments: tuple[str | None, ...]    # per element; None: not written by us
    timeout: int | None = None          # seconds
    size: int | None = None


@dataclass(frozen=True)
class KernelChain:
    type: str | None
    hook: str | None
    priority: int | None
    policy: str | None
    comments: tuple[str | None, ...] = ()   # per rule, in order; None: not written by us
    handles: tuple[int, ...] = ()


@dataclass(frozen=True)
class KernelNft:
    """Our table as the kernel holds it (exists False: no table)."""

    exists: bool = False
    counters: frozenset[str] = frozenset()
    sets: dict[str, KernelSet] = field(default_factory=dict)
    chains: dict[str, KernelChain] = field(default_factory=dict)


@dataclass
class Transaction:
    script: Script = field(default_factory=Script)
    changes: list[Change] = field(default_factory=list)
    dnat_changed: set[Family] = field(default_factory=set)

    def record(self, action: str, obj: str, message: str) -> None:
        self.changes.append(Change(action, obj, message))  # type: ignore[arg-type]


def _flags(flags: tuple[str, ...]) -> tuple[str, ...]:
    # nft 1.0.6 leaves `dynamic` out of its JSON: a meter's other flags and timeout tell it apart
    return tuple(sorted(f for f in flags if f != "dynamic"))


def _declared(s: NftSet, k: KernelSet) -> bool:
    want = (s.kind, s.key, s.value, _flags(s.flags), s.timeout, s.size)
    return want == (k.kind, k.key, k.value, _flags(k.flags), k.timeout, k.size)


def _chain_declared(c: NftChain, k: KernelChain) -> bool:
    return (c.type, c.hook, c.priority, c.policy) == (k.type, k.hook, k.priority, k.policy)


def _dnat_family(name: str) -> Family | None:
    if name.startswith("dnat"):
        return 4 if name[4:5] == "4" else 6
    return None


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def nft_transaction(desired: NftTable, kernel: KernelNft) -> Transaction:
    """The one transaction that makes `kernel` equal `desired`, and what it changes."""
    tx = Transaction()
    if desired.empty:
        if kernel.exists:
            tx.script.add(f"delete table {WHERE}")
            tx.record("removed", "table", f"removed table {WHERE}")
            tx.dnat_changed |= {f for f in map(_dnat_family, kernel.sets) if f}
        return tx
    if not kernel.exists:
        tx.script = creation_script(desired)
        tx.record("added", "table", f"added table {WHERE}: {_plural(len(desired.chains), 'chain')}, "
                                    f"{_plural(len(desired.sets), 'set')} and maps, "
                                    f"{_plural(len(desired.counters), 'counter')}")
        for s in desired.sets:
            tx.record("added", "set", f"added {s.kind} {s.name} ({WHERE}) with "
                                      f"{_plural(len(s.elements), 'element')}")
            if f := _dnat_family(s.name):
                tx.dnat_changed.add(f)
        for c in desired.chains:
            tx.record("added", "chain", f"added chain {c.name} ({WHERE}, {c.hook} priority {c.priority}) "
                                        f"with {_plural(len(c.rules), 'rule')}")
        return tx

    script = tx.script
    wanted_sets = {s.name: s for s in desired.sets}
    wanted_chains = {c.name: c for c in desired.chains}
    doomed_sets = [n for n, k in kernel.sets.items()
                   if n not in wanted_sets or not _declared(wanted_sets[n], k)]
    refill_all = bool(doomed_sets)  # rules reference sets: deleting one needs the chains empty

    missing_counters = [n for n in desired.counters if n not in kernel.counters]
    for name in missing_counters:
        script.add(f"add counter {WHERE} {name}")
    _records(tx, "added", "counter", [f"added counter {n} ({WHERE})" for n in missing_counters],
             f"added {len(missing_counters)} counters ({WHERE})")

    refill: list[NftChain] = []   # chains flushed here, their rules re-added below
    readd: list[NftChain] = []    # chains deleted here (or missing), re-added whole below
    for name, k in kernel.chains.items():
        c = wanted_chains.get(name)
        if c is None:
            script.add(f"flush chain {WHERE} {name}")
            script.add(f"delete chain {WHERE} {name}")
            tx.record("removed", "chain", f"removed chain {name} ({WHERE})")
        elif not _chain_declared(c, k):
            script.add(f"flush chain {WHERE} {name}")
            script.add(f"delete chain {WHERE} {name}")
            readd.append(c)
            tx.record("replaced", "chain", f"replaced chain {name} ({WHERE}): {k.type} {k.hook} priority "
                                           f"{k.priority} policy {k.policy} -> {c.type} {c.hook} priority "
                                           f"{c.priority} policy {c.policy}")
        elif refill_all or k.comments != tuple(r.comment for r in c.rules):
            script.add(f"flush chain {WHERE} {name}")
            refill.append(c)
            if k.comments != tuple(r.comment for r in c.rules):
                tx.record("replaced", "chain", f"replaced chain {name} ({WHERE}): {_rule_change(c, k)}")
    for name in doomed_sets:
        k = kernel.sets[name]
        script.add(f"delete {k.kind} {WHERE} {name}")
        if name not in wanted_sets:
            tx.record("removed", "set", f"removed {k.kind} {name} ({WHERE})")
        if f := _dnat_family(name):
            tx.dnat_changed.add(f)
    for s in desired.sets:
        k = kernel.sets.get(s.name)
        if k is None or s.name in doomed_sets:
            add_set(script, s)
            if k is None:
                tx.record("added", "set", f"added {s.kind} {s.name} ({WHERE}) with "
                                          f"{_plural(len(s.elements), 'element')}")
            else:
                tx.record("replaced", "set", f"replaced {s.kind} {s.name} ({WHERE}): declared "
                                             f"{_decl(k)} -> {s.declaration()}")
            if f := _dnat_family(s.name):
                tx.dnat_changed.add(f)
            continue
        if s.dynamic:
            continue  # the kernel's buckets, not ours to compare
        if _element_changes(tx, s, k) and (f := _dnat_family(s.name)):
            tx.dnat_changed.add(f)
    for c in desired.chains:
        if c.name not in kernel.chains:
            tx.record("added", "chain", f"added chain {c.name} ({WHERE}, {c.hook} priority {c.priority}) "
                                        f"with {_plural(len(c.rules), 'rule')}")
            readd.append(c)
    for c in readd:
        add_chain(script, c)
    for c in refill:
        add_rules(script, c)
    extra_counters = sorted(kernel.counters - set(desired.counters))
    for name in extra_counters:
        script.add(f"delete counter {WHERE} {name}")
    _records(tx, "removed", "counter", [f"removed counter {n} ({WHERE})" for n in extra_counters],
             f"removed {len(extra_counters)} counters ({WHERE})")
    return tx


def _decl(k: KernelSet) -> str:
    typ = " . ".join(k.key) + (" : " + " . ".join(k.value) if k.value is not None else "")
    timeout = f" timeout {k.timeout}s;" if k.timeout is not None else ""
    size = f" size {k.size};" if k.size is not None else ""
    return f"type {typ}; flags {', '.join(k.flags)};{timeout}{size}"


def _rule_change(c: NftChain, k: KernelChain) -> str:
    wanted = Counter(r.comment for r in c.rules)
    have = Counter(k.comments)
    missing = sum((wanted - have).values())
    extra = sum((have - wanted).values())
    if not missing and not extra:
        return f"rules in the wrong order or repeated ({len(k.comments)} rules)"
    return (f"{_plural(len(k.comments), 'rule')} -> {_plural(len(c.rules), 'rule')} ({missing} missing, "
            f"{extra} not ours)")


def _element_changes(tx: Transaction, s: NftSet, k: KernelSet) -> bool:
    """Stage the element changes of one set; whether there were any."""
    wanted = Counter(e.comment for e in s.elements)
    have = Counter(k.comments)
    if wanted == have:
        return False
    missing = [e for e in s.elements if have[e.comment] < 1]
    if not (have - wanted):  # the kernel holds nothing we do not want: add what it lacks
        add_elements(tx.script, s, missing)
    else:
        tx.script.add(f"flush {s.kind} {WHERE} {s.name}")
        add_elements(tx.script, s, s.elements)
    lines = [f"added element {e.label + ' ' if e.label else ''}{e.text} to {s.kind} {s.name} ({WHERE})"
             for e in missing]
    for comment, n in (have - wanted).items():
        what = f"{comment} (label and digest)" if comment else "not written by tagrouted"
        lines += [f"removed element {what} from {s.kind} {s.name} ({WHERE})"] * n
    _records(tx, None, "element", lines,
             f"replaced elements of {s.kind} {s.name} ({WHERE}): {sum(have.values())} -> "
             f"{len(s.elements)} elements ({len(missing)} added, {sum((have - wanted).values())} removed)")
    return True


def _records(tx: Transaction, action: str | None, obj: str, lines: list[str], summary: str) -> None:
    """One record per change, or one summary record when a change touches many objects."""
    if not lines:
        return
    if len(lines) <= PER_ELEMENT_RECORDS:
        for line in lines:
            tx.record(action or line.split(" ", 1)[0], obj, line)
    else:
        tx.record(action or "replaced", obj, summary)


def drift_lines(desired: NftTable, kernel: KernelNft) -> list[str]:
    """`tagroutectl diff` lines: + what the kernel lacks (as the nft command that adds it),
    - what it has that we do not want, ~ what differs in place."""
    if desired.empty:
        return [f"-table {WHERE}"] if kernel.exists else []
    if not kernel.exists:
        return [f"+{line}" for line in creation_script(desired).lines]
    lines: list[str] = []
    lines += [f"+add counter {WHERE} {n}" for n in desired.counters if n not in kernel.counters]
    lines += [f"-counter {n} ({WHERE})" for n in sorted(kernel.counters - set(desired.counters))]
    for s in desired.sets:
        k = kernel.sets.get(s.name)
        if k is None:
            script = Script()
            add_set(script, s)
            lines += [f"+{line}" for line in script.lines]
        elif not _declared(s, k):
            lines.append(f"~{s.kind} {s.name} ({WHERE}): declared {_decl(k)}, want {s.declaration()}")
        elif not s.dynamic:
            have = Counter(k.comments)
            lines += [f"+add element {WHERE} {s.name} {{ {e.command_text()} }}"
                      for e in s.elements if have[e.comment] < 1]
            extra = have - Counter(e.comment for e in s.elements)
            lines += [f"-element of {s.kind} {s.name} ({WHERE}): {c or 'not written by tagrouted'}"
                      for c in _expand(extra)]
    names = {s.name for s in desired.sets}
    lines += [f"-{k.kind} {n} ({WHERE})" for n, k in kernel.sets.items() if n not in names]
    for c in desired.chains:
        kc = kernel.chains.get(c.name)
        if kc is None:
            script = Script()
            add_chain(script, c)
            lines += [f"+{line}" for line in script.lines]
            continue
        if not _chain_declared(c, kc):
            lines.append(f"~chain {c.name} ({WHERE}): {kc.type} {kc.hook} priority {kc.priority} policy "
                         f"{kc.policy}, want {c.declaration()}")
        want = [r.comment for r in c.rules]
        if list(kc.comments) != want:
            have = Counter(kc.comments)
            lines += [f"+add rule {WHERE} {c.name} {r.command_text()}"
                      for r in c.rules if have[r.comment] < 1]
            wanted = set(want)
            lines += [f"-rule of chain {c.name} ({WHERE}), handle {h}: {cm or 'not written by tagrouted'}"
                      for cm, h in zip(kc.comments, kc.handles, strict=False) if cm not in wanted]
            if Counter(kc.comments) == Counter(want):
                lines.append(f"~rules of chain {c.name} ({WHERE}) in the wrong order or repeated")
    lines += [f"-chain {n} ({WHERE})" for n in kernel.chains if n not in {c.name for c in desired.chains}]
    return lines


def _expand(counts: Counter[str | None]) -> Iterable[str | None]:
    for item, n in counts.items():
        yield from [item] * n
