"""The iptables adapter: our TAGROUTED-* chains and their jumps, one table of one family at a time,
written through python-iptables' libiptc bindings into the LEGACY tables.

Owns: chains named exactly TAGROUTED-<BUILTIN> (CHAIN_PREFIX + the name of one of the table's
built-in chains; never another TAGROUTED-* chain) in mangle/nat/filter of IPv4 and IPv6, and
in each built-in chain the one rule `-m comment --comment tagrouted -j TAGROUTED-<BUILTIN>` at
position 0. Any other rule that jumps to one of our chains is a stray reference to our brand: it
is removed when the jump is put right or the chain goes. Never touches anything else: other
chains, other rules (libiptc carries their counters over a commit) and policies. Any libiptc
commit zeroes the built-in chains' policy counters (iptables-legacy's own commits do too), so a
table is committed only when something of ours differs. A table the namespace has not
instantiated is never opened (opening one creates it and hooks it into every packet's path).

Writes: one libiptc commit per table, under an exclusive flock on /run/xtables.lock (the lock
iptables-legacy itself takes), so a concurrent `iptables -w -A` is never lost. Writers that skip
the lock (python-iptables users) make our commit fail with EAGAIN: the whole read-compare-commit
is then redone on a fresh handle, with doubling backoff, a few times (IptablesTransient after).

Comparison (never text against text): a desired FirewallRule is built into the binary entry the
kernel will hold, and `canonical(rule)` decodes that entry with the extensions' own save()
functions, as kernel entries are decoded. A sync first compares the kernel's entries with the
built ones byte for byte (counters and kernel-private bytes masked out); only entries that
differ are decoded and compared in canonical form (diff.chain_changes gives the changes).

Caches: built entries, canonical forms, decoded entries and entry keys are pure functions of
their input (and of the host's libxtables), valid in any network namespace. No kernel state is
remembered between calls: every call re-reads the table through a fresh libiptc handle.

Threading: every call holds one process-wide lock (libxtables keeps per-extension parse state in
globals); calls from several threads are serialised.

Traps in python-iptables 1.2 / libxtables 1.8.9, and what this module does about them:
- iptc.Table objects are cached per process and share one autocommit flag: we never make one;
  each call opens its own libiptc handle (iptc_init) and frees it.
- iptc.Rule/Match/Target are not used: Target() opens every table of the process-wide cache to
  ask whether a name is a chain; Rule6 fills interface masks with 0x01 bytes, so `-i eth0` also
  matches other names (python-iptables #244); setting an option costs a dir() and final_check()
  re-parses everything through save() and a stdout pipe (~1 s per 1000 DNAT rules). We fill the
  ip/ip6 header as xtables_parse_interface does and drive the extensions' init/parse/final check
  through python-iptables' xtables layer: ~0.08 ms per rule, once per rule per process.
- libxtables 1.8.9 registers a target .so only for the family current when it is loaded, dies
  ("already registered") if its init runs twice, and remembers a failed target look-up by name
  for both families (python-iptables #316, #325): _Registry loads each extension itself, a
  private memfd copy for the second family, and looks up only what it has seen registered.
- An option of two words (`--tcp-flags SYN,RST SYN`, which TCPMSS needs so that SYN-ACKs are
  clamped too) is parsed by libxt_tcp from argv[optind]: _extension passes both words.
- Extension save() functions print to C stdout: glibc's `stdout` is pointed at an
  open_memstream buffer for a batch of decodes, so fd 1 and Python's output are untouched.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import errno
import fcntl
import functools
import logging
import os
import shlex
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ...core.diff import FAMILY_NAME, chain_changes
from ...core.iptables_rules import (
    CountedRule,
    counted_rules,
    legacy_chains,
    path_counted_rules,
    policy_rules,
)
from ...core.plan import jump_line
from ...core.state import (
    BUILTIN_CHAINS,
    CHAIN_PREFIX,
    JUMP_COMMENT,
    TABLE_ORDER,
    Change,
    Family,
    FirewallIntent,
    FirewallRule,
    KernelTable,
    Match,
    OwnedChain,
    owned_chain_name,
)
from . import IPTABLES_LEGACY, Counters, FirewallSync

log = logging.getLogger("tagrouted.iptables")

LOCK_PATH = os.environ.get("XTABLES_LOCKFILE", "/run/xtables.lock")
LOCK_WAIT = 5.0        # seconds to wait for /run/xtables.lock before giving up (IptablesTransient)
ATTEMPTS = 4           # read-compare-commit attempts when a commit races another writer
FIRST_BACKOFF = 0.05   # seconds; doubles per attempt
STANDARD_VERDICTS = ("ACCEPT", "DROP", "RETURN", "QUEUE")
_PROTO_NUMBERS = {"all": 0, "icmp": 1, "tcp": 6, "udp": 17, "gre": 47, "esp": 50, "ah": 51,
                  "ipv6-icmp": 58, "icmpv6": 58, "sctp": 132, "udplite": 136}
_PROTO_NAMES = {6: "tcp", 17: "udp", 1: "icmp", 58: "ipv6-icmp", 47: "gre", 50: "esp", 51: "ah",
                132: "sctp", 136: "udplite"}
_MFD_EXEC = 0x10       # memfd_create(2): the copy may be mapped executable (Linux >= 6.3)
_XT_HEADER = 32        # struct xt_entry_match / xt_entry_target: u16 size, char name[29], u8 revision
_NAME_LEN = 29
# Options that take two words (iptables reads the second from argv[optind]).
_TWO_WORD_OPTIONS = frozenset({"tcp-flags"})


class IptablesError(Exception):
    """libiptc refused an operation (bad rule, missing table or extension)."""


class IptablesTransient(IptablesError):
    """The xtables lock stayed held, or commits kept racing other writers: retry later."""


class _NoTable(IptablesError):
    """The kernel has no such table (e.g. no ip6table_nat): nothing of ours can be in it."""


class _Retry(Exception):
    """One attempt raced another writer (EAGAIN); the caller backs off and starts over."""


# ---- python-iptables / libxtables plumbing (imported lazily: only edges need libiptc) -------

_lock = threading.RLock()


@functools.cache
def _iptc() -> Any:
    if "iptc" not in sys.modules:
        # python-iptables imports distutils.sysconfig; setuptools' distutils shim would answer
        # by importing setuptools and pkg_resources (+16 MB RSS, +0.3 s): the stdlib's will do.
        shims = [f for f in sys.meta_path if type(f).__module__ == "_distutils_hack"]
        for shim in shims:
            sys.meta_path.remove(shim)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                import iptc  # python-iptables: loads libip4tc, libip6tc and libxtables
        finally:
            sys.meta_path[0:0] = shims
    import iptc
    from iptc import ip4tc, ip6tc, xtables

    return iptc, ip4tc, ip6tc, xtables


def _errno() -> int:
    """python-iptables loads libiptc without use_errno: read libc's errno right after a call."""
    _, ip4tc, _, _ = _iptc()
    return int(ip4tc._get_errno_loc()[0])


def _strerror(fam: _Family, err: int) -> str:
    msg = fam.lib.iptc_strerror(err)
    return msg.decode() if msg else os.strerror(err)


@dataclass
class _Lib:
    """One extension .so of the xtables directory, loaded by us."""

    path: str
    families: set[int] = field(default_factory=set)  # NFPROTO values whose variants are registered
    unspec: bool = False  # registered family-neutral variants: a copy would register them twice


class _Registry:
    """Extension look-ups that survive libxtables 1.8.9 with both families in one process.

    A target .so registers only the current family's variants when dlopen()ed, and a failed
    target look-up is remembered by name for both families. So a name is looked up only once it
    is seen in libxtables' lists; for the second family a private copy of the .so is loaded,
    unless it registered family-neutral variants (those serve both families, and a copy would
    register them twice)."""

    LISTS: ClassVar[dict[str, tuple[str, str]]] = {
        "match": ("xtables_pending_matches", "xtables_matches"),
        "target": ("xtables_pending_targets", "xtables_targets"),
    }

    def __init__(self) -> None:
        self.libs: dict[str, _Lib] = {}
        self.handles: list[Any] = []  # keeps every .so we loaded mapped for the process life
        self.found: dict[tuple[int, str, str], Any] = {}  # (nfproto, kind, name) -> module | None

    def _walk(self, kind: str, nfproto: int) -> Iterator[tuple[int, Any]]:
        """(address, struct) of every pending and registered extension of `kind`."""
        _, _, _, X = _iptc()
        xt = X.xtables(nfproto)
        struct_cls = xt._match_struct if kind == "match" else xt._target_struct
        for var in self.LISTS[kind]:
            p = ct.c_void_p.in_dll(X._lib_xtables, var).value
            seen: set[int] = set()
            while p and p not in seen:
                seen.add(p)
                ext = struct_cls.from_address(p)
                yield p, ext
                p = ext.next

    def _listed(self, kind: str, name: str, nfproto: int) -> bool:
        raw = name.encode()
        return any(ext.name == raw and ext.family in (nfproto, 0) for _, ext in self._walk(kind, nfproto))

    def _families(self, nfproto: int) -> dict[int, int]:
        return {addr: ext.family for kind in self.LISTS for addr, ext in self._walk(kind, nfproto)}

    def _so_path(self, name: str, nfproto: int) -> str | None:
        _, _, _, X = _iptc()
        prefix = "libipt_" if nfproto == X.NFPROTO_IPV4 else "libip6t_"
        for libdir in str(X._xtables_libdir).split(":"):
            for cand in (f"{prefix}{name}.so", f"libxt_{name}.so"):
                path = os.path.join(libdir, cand)
                if os.path.exists(path):
                    return os.path.realpath(path)
        return None

    def _load(self, name: str, nfproto: int) -> None:
        """Get `name`'s .so to register its variants for `nfproto`, if that can be done safely."""
        _, _, _, X = _iptc()
        path = self._so_path(name, nfproto)
        if path is None:
            return
        X.xtables._xtables_set_nfproto(nfproto)
        lib = self.libs.get(path)
        if lib is None:
            if _dl_loaded(path):
                return  # loaded behind our back: what it registered is unknown
            before = self._families(nfproto)
            self.handles.append(ct.CDLL(path))  # its constructor registers this family
            new = [fam for addr, fam in self._families(nfproto).items() if addr not in before]
            self.libs[path] = _Lib(path, {nfproto}, unspec=0 in new)
            return
        if nfproto in lib.families or lib.unspec:
            return
        # A second dlopen of the same file runs no constructor, and calling its init again
        # dies on "already registered" (libxtables checks ->next first). A copy in a memfd is
        # a new object with fresh structs: its constructor registers this family's variants.
        # The memfd stays open: dlopen knows objects by path, and a reused descriptor number
        # would hand back the previous copy without running its constructor.
        lib.families.add(nfproto)  # one attempt per family
        try:
            try:  # MFD_EXEC: kernels with vm.memfd_noexec would seal it non-executable
                fd = os.memfd_create(os.path.basename(path), os.MFD_CLOEXEC | _MFD_EXEC)
            except OSError:  # kernels before 6.3 know no MFD_EXEC
                fd = os.memfd_create(os.path.basename(path), os.MFD_CLOEXEC)
            with open(path, "rb") as f:
                data = memoryview(f.read())
            while data:
                data = data[os.write(fd, data):]
            self.handles.append((fd, ct.CDLL(f"/proc/self/fd/{fd}")))
        except OSError as e:
            log.warning("can't load a copy of %s for %s rules: %s", path,
                        "IPv4" if nfproto == X.NFPROTO_IPV4 else "IPv6", e)

    def module(self, kind: str, name: str, nfproto: int) -> Any:
        """The xtables_match / xtables_target struct for `name`, or None if unavailable."""
        key = (nfproto, kind, name)
        if key in self.found:
            return self.found[key]
        _, _, _, X = _iptc()
        xt = X.xtables(nfproto)
        lookup = "standard" if kind == "target" and name in ("", *STANDARD_VERDICTS) else name
        module = None
        if not lookup.startswith(CHAIN_PREFIX):
            if not self._listed(kind, lookup, nfproto):
                self._load(lookup, nfproto)
            if self._listed(kind, lookup, nfproto):
                X.xtables._xtables_set_nfproto(nfproto)
                if kind == "match":
                    ptr = X.xtables._xtables_find_match(lookup.encode(), X.XTF_DONT_LOAD, None)
                    struct_cls = xt._match_struct
                else:
                    ptr = X.xtables._xtables_find_target(lookup.encode(), X.XTF_DONT_LOAD)
                    struct_cls = xt._target_struct
                if ptr:
                    module = ct.cast(ptr, ct.POINTER(struct_cls))[0]
        self.found[key] = module
        return module


def _dl_loaded(path: str) -> bool:
    """Whether the process already has `path` mapped (dlopen with RTLD_NOLOAD)."""
    libc = ct.CDLL(None)
    libc.dlopen.restype = ct.c_void_p
    libc.dlopen.argtypes = [ct.c_char_p, ct.c_int]
    libc.dlclose.argtypes = [ct.c_void_p]
    rtld_noload = 0x4
    handle = libc.dlopen(path.encode(), ct.RTLD_GLOBAL | rtld_noload | os.RTLD_NOW)
    if handle:
        libc.dlclose(handle)
        return True
    return False


@functools.cache
def _registry() -> _Registry:
    return _Registry()


class _Family:
    """Per-family constants: structs, libiptc functions, python-iptables classes."""

    def __init__(self, family: Family) -> None:
        _, ip4tc, ip6tc, X = _iptc()
        self.family = family
        self.nfproto = X.NFPROTO_IPV4 if family == 4 else X.NFPROTO_IPV6
        self.xt = X.xtables(self.nfproto)
        if family == 4:
            self.entry_cls, self.ip_cls, self.lib = ip4tc.ipt_entry, ip4tc.ipt_ip, ip4tc.iptc()
            self.addr_len, self.proto_flag, self.known_flags = 4, 0, 0
        else:
            self.entry_cls, self.ip_cls, self.lib = ip6tc.ip6t_entry, ip6tc.ip6t_ip6, ip6tc.ip6tc()
            self.addr_len, self.proto_flag, self.known_flags = 16, 0x01, 0x01
        self.ip_size = ct.sizeof(self.ip_cls)
        self.entry_size = X.xt_align(ct.sizeof(self.entry_cls))
        self.off_target = self.entry_cls.target_offset.offset
        f = self.ip_cls
        self.off = {name: getattr(f, name).offset for name in (
            "src", "dst", "smsk", "dmsk", "iniface", "outiface", "iniface_mask", "outiface_mask",
            "proto", "flags", "invflags")}
        _registry().module("target", "standard", self.nfproto)
        self.usersize: dict[tuple[str, bytes, int], int] = {}

    def data_usersize(self, kind: str, name: bytes, revision: int) -> int:
        """How many bytes of an extension's data userspace owns (the kernel may keep private
        state after them), or -1 when unknown (then all of it counts)."""
        module = _registry().module(kind, name.decode(errors="replace"), self.nfproto)
        size = int(module.userspacesize) if module is not None and module.revision == revision else -1
        self.usersize[(kind, name, revision)] = size
        return size


@functools.cache
def _family(family: Family) -> _Family:
    return _Family(family)


# ---- entries: build, key, decode -----------------------------------------------------------

@dataclass(frozen=True)
class _Built:
    entry: bytes   # what libiptc is handed
    key: bytes     # what the kernel's copy of it must equal (see _entry_key)


def _split_name(raw: bytes) -> bytes:
    return raw.split(b"\0", 1)[0]


_HEADER = struct.Struct("H29sB")
_U16 = struct.Struct("H")


def _entry_key(fam: _Family, e: bytes, target_name: str, standard: bool) -> bytes:
    """The bytes of an entry that decide what it does: the ip header, each extension's size,
    name, revision and userspace data, and the target (by name for verdicts and jumps, which
    libiptc turns into offsets). Left out: counters, comefrom, kernel-private data, and the
    bytes after each name's NUL (the kernel never writes them: libiptc's heap shows through)."""
    parts = [e[:fam.ip_size]]
    target_offset = _U16.unpack_from(e, fam.off_target)[0]
    off = fam.entry_size
    usersize = fam.usersize
    while off < target_offset:
        size, raw_name, rev = _HEADER.unpack_from(e, off)
        if size < _XT_HEADER:
            parts.append(b"!" + e[off:target_offset])
            break
        name = raw_name.split(b"\0", 1)[0]
        n = usersize.get(("match", name, rev))
        if n is None:
            n = fam.data_usersize("match", name, rev)
        data = e[off + _XT_HEADER: off + size] if n < 0 else e[off + _XT_HEADER: off + _XT_HEADER + n]
        parts += (_HEADER.pack(size, name, rev), data)
        off += size
    if standard:
        parts.append(b"S" + target_name.encode())
    else:
        size, raw_name, rev = _HEADER.unpack_from(e, target_offset)
        name = raw_name.split(b"\0", 1)[0]
        n = usersize.get(("target", name, rev))
        if n is None:
            n = fam.data_usersize("target", name, rev)
        start = target_offset + _XT_HEADER
        data = e[start: target_offset + size] if n < 0 else e[start: start + n]
        parts += (b"M", _HEADER.pack(size, name, rev), data)
    return b"".join(parts)


def _ip_header(fam: _Family, rule: FirewallRule) -> bytes:
    """ipt_ip / ip6t_ip6 for the rule's addresses, interfaces and protocol."""
    buf = bytearray(fam.ip_size)
    inv = 0
    for key, value, flag in (("src", rule.source, 0x08), ("dst", rule.destination, 0x10)):
        if not value:
            continue
        if value.startswith("!"):
            inv |= flag
            value = value[1:].strip()
        addr, mask = _parse_prefix(value, fam)
        buf[fam.off[key]: fam.off[key] + fam.addr_len] = bytes(a & m for a, m in zip(addr, mask, strict=True))
        mkey = "smsk" if key == "src" else "dmsk"
        buf[fam.off[mkey]: fam.off[mkey] + fam.addr_len] = mask
    for key, value, flag in (("iniface", rule.in_interface, 0x01), ("outiface", rule.out_interface, 0x02)):
        if not value:
            continue
        if value.startswith("!"):
            inv |= flag
            value = value[1:].strip()
        name, mask = _parse_interface(value)
        buf[fam.off[key]: fam.off[key] + 16] = name
        buf[fam.off[key + "_mask"]: fam.off[key + "_mask"] + 16] = mask
    flags = 0
    if rule.protocol:
        proto = rule.protocol
        if proto.startswith("!"):
            inv |= 0x40  # XT_INV_PROTO
            proto = proto[1:].strip()
        number = _proto_number(proto)
        struct.pack_into("H", buf, fam.off["proto"], number)
        if number:
            flags |= fam.proto_flag
    buf[fam.off["flags"]] = flags
    buf[fam.off["invflags"]] = inv
    return bytes(buf)


def _parse_prefix(value: str, fam: _Family) -> tuple[bytes, bytes]:
    af = socket.AF_INET if fam.family == 4 else socket.AF_INET6
    addr, _, plen = value.partition("/")
    raw = socket.inet_pton(af, addr)
    bits = fam.addr_len * 8
    if not plen:
        n = bits
    elif plen.isdigit():
        n = int(plen)
        if n > bits:
            raise ValueError(f"bad prefix length in {value!r}")
    else:
        return raw, socket.inet_pton(af, plen)
    mask = ((1 << bits) - 1) ^ ((1 << (bits - n)) - 1)
    return raw, mask.to_bytes(fam.addr_len, "big")


def _parse_interface(value: str) -> tuple[bytes, bytes]:
    """As xtables_parse_interface: the mask covers the name and its NUL; `eth+` is a prefix."""
    if len(value) + 1 > 16:
        raise ValueError(f"interface name {value!r} too long")
    name = value.encode().ljust(16, b"\0")
    mask = b"\xff" * (len(value) - 1 if value.endswith("+") else len(value) + 1)
    return name, mask.ljust(16, b"\0")


def _proto_number(proto: str) -> int:
    if proto.isdigit():
        return int(proto)
    if proto.lower() in _PROTO_NUMBERS:
        return _PROTO_NUMBERS[proto.lower()]
    return socket.getprotobyname(proto)


def _is_standard(target: str) -> bool:
    return target in STANDARD_VERDICTS or target.startswith(CHAIN_PREFIX)


def _extension(fam: _Family, kind: str, name: str, options: tuple[tuple[str, str], ...],
               entry: Any) -> bytes:
    """One xt_entry_match / xt_entry_target, filled by the extension's own init, parse and
    final check (python-iptables' xtables layer; its Match/Target objects cost ~10x more)."""
    _, _, _, X = _iptc()
    lookup = "standard" if kind == "target" and _is_standard(name) else name
    module = _registry().module(kind, lookup, fam.nfproto)
    if module is None:
        raise IptablesError(f"{kind} {name!r} is not available ({FAMILY_NAME[fam.family]})")
    flag = "-m" if kind == "match" else "-j"
    header = X.xt_entry_match if kind == "match" else X.xt_entry_target
    field_name = "m" if kind == "match" else "t"
    size = X.xt_align(module.size + ct.sizeof(header))
    # malloc'ed, as iptables does: an old-style parse may realloc() it through module->m/t.
    raw = _libc().calloc(1, size)
    if not raw:
        raise MemoryError(f"{flag} {name}")
    real_name = getattr(module, "real_name", None) or name.encode()
    struct.pack_into("H29sB", (ct.c_ubyte * size).from_address(raw), 0, size, real_name, module.revision)
    ptr = ct.cast(raw, ct.POINTER(header))
    if module.init:
        module.init(ptr)
    udata = None
    if getattr(module, "udata_size", 0):
        udata = (ct.c_ubyte * module.udata_size)()
        module.udata = ct.cast(udata, ct.c_void_p)
    # Parse state lives in the (global) extension struct: one rule at a time, under _lock.
    setattr(module, field_name, ptr)
    setattr(module, "mflags" if kind == "match" else "tflags", 0)
    ptrptr = ct.cast(ct.addressof(module) + getattr(type(module), field_name).offset,
                     ct.POINTER(ct.c_void_p))
    parse = fam.xt.parse_match if kind == "match" else fam.xt.parse_target
    try:
        for opt, value in options:
            invert = value.startswith("!")
            if invert:
                value = value[1:].strip()
            words = value.split(" ", 1) if opt in _TWO_WORD_OPTIONS else [value]
            argv = (ct.c_char_p * (1 + len(words)))(opt.encode(), *(w.encode() for w in words))
            try:
                parse(argv, ct.c_int(invert), module, ct.pointer(entry), ptrptr, None, None)
            except Exception as e:
                raise IptablesError(f"{flag} {name} --{opt} {value}: {e}") from None
        if kind == "match":
            fam.xt.final_check_match(module)
        else:
            fam.xt.final_check_target(module)
        done = getattr(module, field_name)
        return ct.string_at(done, done[0].u.match_size if kind == "match" else done[0].u.target_size)
    except _parse_errors() as e:
        raise IptablesError(f"{flag} {name}: {e}") from None
    finally:
        _libc().free(ct.cast(getattr(module, field_name), ct.c_void_p))
        setattr(module, field_name, None)
        del udata


@functools.cache
def _libc() -> Any:
    libc = ct.CDLL(None)
    libc.calloc.restype = ct.c_void_p
    libc.calloc.argtypes = [ct.c_size_t, ct.c_size_t]
    libc.free.argtypes = [ct.c_void_p]
    return libc


def _parse_errors() -> tuple[type[BaseException], ...]:
    _, _, _, X = _iptc()
    return (X.XTablesError, ValueError, AttributeError)


@functools.lru_cache(maxsize=16384)
def _build(rule: FirewallRule, family: Family) -> _Built:
    """The entry libiptc gets for `rule` (parsed once per process: a pure function of it)."""
    with _lock:
        fam = _family(family)
        header = bytearray(fam.entry_size)
        header[:fam.ip_size] = _ip_header(fam, rule)
        entry = fam.entry_cls.from_buffer_copy(header)  # what parse functions see as the rule
        matches = b"".join(_extension(fam, "match", m.name, m.options, entry) for m in rule.matches)
        target = _extension(fam, "target", rule.target, rule.target_options, entry)
        struct.pack_into("HH", header, fam.off_target, fam.entry_size + len(matches),
                         fam.entry_size + len(matches) + len(target))
        raw = bytes(header) + matches + target
        return _Built(raw, _entry_key(fam, raw, rule.target, _is_standard(rule.target)))


def _jump_rule(builtin: str) -> FirewallRule:
    return FirewallRule(matches=(Match("comment", (("comment", JUMP_COMMENT),)),),
                        target=owned_chain_name(builtin))


class _Capture:
    """Points glibc's `stdout` at a memory stream while extension save() functions print."""

    def __init__(self) -> None:
        self.libc = ct.CDLL(None)
        self.libc.open_memstream.restype = ct.c_void_p
        self.libc.open_memstream.argtypes = [ct.POINTER(ct.c_void_p), ct.POINTER(ct.c_size_t)]
        self.libc.fflush.argtypes = [ct.c_void_p]
        self.libc.fclose.argtypes = [ct.c_void_p]
        self.libc.free.argtypes = [ct.c_void_p]
        self.stdout = ct.c_void_p.in_dll(self.libc, "stdout")

    @contextmanager
    def capture(self) -> Iterator[Any]:
        buf, size = ct.c_void_p(), ct.c_size_t()
        stream = self.libc.open_memstream(ct.byref(buf), ct.byref(size))
        if not stream:
            raise OSError(_errno(), "open_memstream failed")
        saved = self.stdout.value
        self.libc.fflush(saved)
        self.stdout.value = stream
        result: dict[str, Any] = {"size": size, "text": b""}
        try:
            yield result
        finally:
            self.stdout.value = saved
            self.libc.fclose(stream)
            result["text"] = ct.string_at(buf.value, size.value) if buf.value else b""
            self.libc.free(buf)


@functools.cache
def _capture() -> _Capture:
    return _Capture()


@dataclass
class _Pending:
    """One decode in progress: the rule's fields plus save() spans still to be read."""

    fields: dict[str, Any]
    matches: list[tuple[str, tuple[int, int] | None]]
    target: tuple[str, tuple[int, int] | None]


def _decode_many(fam: _Family, items: list[tuple[bytes, str, bool]]) -> list[FirewallRule]:
    """Decode entries (bytes, target name, standard?) with the extensions' own save()."""
    _, _, _, X = _iptc()
    pending: list[_Pending] = []
    with _capture().capture() as out:
        size = out["size"]
        for e, target_name, standard in items:
            buf = (ct.c_ubyte * len(e)).from_buffer_copy(e)
            ip = fam.ip_cls.from_buffer(buf)
            fields, extra = _decode_ip(fam, e)
            target_offset = struct.unpack_from("H", e, fam.off_target)[0]
            matches: list[tuple[str, tuple[int, int] | None]] = []
            off = fam.entry_size
            while off < target_offset:
                msize, raw_name, rev = struct.unpack_from("H29sB", e, off)
                if msize < _XT_HEADER:
                    matches.append(("?broken", None))
                    break
                name = _split_name(raw_name).decode(errors="replace")
                module = _registry().module("match", name, fam.nfproto)
                if module is None or module.revision != rev:
                    matches.append((f"{name}?rev{rev}", None))
                elif not module.save:
                    matches.append((name, (0, 0)))
                else:
                    ptr = ct.cast(ct.byref(buf, off), ct.POINTER(X.xt_entry_match))
                    start = size.value
                    fam.xt.save(module, ip, ptr)
                    matches.append((name, (start, size.value)))
                off += msize
            target: tuple[str, tuple[int, int] | None]
            if standard:
                target = (target_name, (0, 0))
            else:
                _, raw_name, rev = struct.unpack_from("H29sB", e, target_offset)
                name = _split_name(raw_name).decode(errors="replace")
                module = _registry().module("target", name, fam.nfproto)
                if module is None or module.revision != rev:
                    target = (f"{name}?rev{rev}", None)
                elif not module.save:
                    target = (name, (0, 0))
                else:
                    ptr = ct.cast(ct.byref(buf, target_offset), ct.POINTER(X.xt_entry_target))
                    start = size.value
                    fam.xt.save(module, ip, ptr)
                    target = (name, (start, size.value))
            if extra:
                matches.append(("?ip", None))
                fields["extra"] = extra
            pending.append(_Pending(fields, matches, target))
    text = out["text"]
    rules = []
    for p in pending:
        matches_out = []
        for name, span in p.matches:
            if name == "?ip":
                matches_out.append(Match("?ip", (("flags", p.fields.pop("extra")),)))
            elif span is None:
                matches_out.append(Match(name))
            else:
                matches_out.append(Match(name, _options(text[span[0]:span[1]])))
        tname, tspan = p.target
        options = _options(text[tspan[0]:tspan[1]]) if tspan else ()
        rules.append(FirewallRule(matches=tuple(matches_out), target=tname, target_options=options,
                                  **p.fields))
    return rules


def _options(raw: bytes) -> tuple[tuple[str, str], ...]:
    """` --dport 443 ! --sport 1` -> (("dport", "443"), ("sport", "! 1"))."""
    text = raw.decode(errors="replace")
    if any(c in text for c in "\"'\\"):
        try:
            words = shlex.split(text)
        except ValueError:
            return (("?unparsed", text.strip()),)
    else:
        words = text.split()
    out: list[tuple[str, list[str]]] = []
    invert = False
    for w in words:
        if w == "!":
            invert = True
        elif w.startswith("--"):
            out.append((w[2:], ["!"] if invert else []))
            invert = False
        elif out:
            out[-1][1].append(w)
        else:
            out.append(("?", [w]))
    return tuple((k, " ".join(v)) for k, v in out)


def _decode_ip(fam: _Family, e: bytes) -> tuple[dict[str, Any], str]:
    """The FirewallRule fields of an ip header, and what it holds that they cannot say."""
    o = fam.off
    inv = e[o["invflags"]]
    flags = e[o["flags"]]
    fields: dict[str, Any] = {}
    af = socket.AF_INET if fam.family == 4 else socket.AF_INET6
    for key, mkey, name, flag in (("src", "smsk", "source", 0x08), ("dst", "dmsk", "destination", 0x10)):
        addr = e[o[key]: o[key] + fam.addr_len]
        mask = e[o[mkey]: o[mkey] + fam.addr_len]
        if not any(mask) and not any(addr) and not inv & flag:
            continue
        m = int.from_bytes(mask, "big")
        bits = fam.addr_len * 8
        n = bin(m).count("1")
        contiguous = m == ((1 << bits) - 1) ^ ((1 << (bits - n)) - 1)
        text = socket.inet_ntop(af, addr) + "/" + (str(n) if contiguous else socket.inet_ntop(af, mask))
        fields[name] = ("!" if inv & flag else "") + text
    for key, name, flag in (("iniface", "in_interface", 0x01), ("outiface", "out_interface", 0x02)):
        iface = e[o[key]: o[key] + 16]
        mask = e[o[key + "_mask"]: o[key + "_mask"] + 16]
        if mask[0] == 0:
            continue
        text = ""
        for i in range(16):
            if mask[i]:
                if iface[i]:
                    text += chr(iface[i])
            else:
                if iface[i - 1]:
                    text += "+"
                break
        fields[name] = ("!" if inv & flag else "") + text
    proto = struct.unpack_from("H", e, o["proto"])[0]
    if proto or inv & 0x40:
        fields["protocol"] = ("!" if inv & 0x40 else "") + _PROTO_NAMES.get(proto, str(proto))
    unmodelled_flags = flags & ~fam.known_flags
    unmodelled_inv = inv & ~(0x01 | 0x02 | 0x08 | 0x10 | 0x40)
    extra = f"{unmodelled_flags:#x}/{unmodelled_inv:#x}" if unmodelled_flags or unmodelled_inv else ""
    if fam.family == 6 and e[fam.ip_cls.tos.offset]:
        extra += f" tos {e[fam.ip_cls.tos.offset]:#x}"
    return fields, extra


_decoded: dict[tuple[int, bytes], FirewallRule] = {}
_DECODED_MAX = 16384


def _decode_keys(fam: _Family, items: list[tuple[bytes, str, bool, bytes]]) -> list[FirewallRule]:
    """Decode entries (entry, target, standard?, key), reusing earlier decodes of the same key."""
    todo = [item for item in items if (fam.family, item[3]) not in _decoded]
    if todo:
        rules = _decode_many(fam, [(e, t, s) for e, t, s, _ in todo])
        if len(_decoded) + len(todo) > _DECODED_MAX:
            _decoded.clear()
        for (_, _, _, key), rule in zip(todo, rules, strict=True):
            _decoded[(fam.family, key)] = rule
    return [_decoded[(fam.family, key)] for _, _, _, key in items]


def canonical(rule: FirewallRule, family: Family) -> FirewallRule:
    """`rule` as the kernel will show it: built into an entry, decoded back like kernel rules."""
    return _canonical(rule, family)


@functools.lru_cache(maxsize=16384)
def _canonical(rule: FirewallRule, family: Family) -> FirewallRule:
    with _lock:
        fam = _family(family)
        built = _build(rule, family)
        return _decode_keys(fam, [(built.entry, rule.target, _is_standard(rule.target), built.key)])[0]


# ---- libiptc handle ------------------------------------------------------------------------

@dataclass(frozen=True)
class _KRule:
    """One rule as read from a libiptc handle."""

    entry: bytes
    target: str      # what iptc_get_target says: ACCEPT, a chain name, DSCP ...
    standard: bool   # a verdict or jump (libiptc keeps those as offsets, not by name)
    key: bytes


class _Handle:
    """A private libiptc handle on one table: read, change in memory, commit once, free."""

    def __init__(self, fam: _Family, table: str) -> None:
        self.fam, self.table, self.lib = fam, table, fam.lib
        self.h = self.lib.iptc_init(table.encode())
        if not self.h:
            err = _errno()
            if err == errno.EAGAIN:
                raise _Retry(f"reading table {table}: {_strerror(fam, err)}")
            if err == errno.ENOENT:
                raise _NoTable(f"no table {table} ({FAMILY_NAME[fam.family]}): {_strerror(fam, err)}")
            raise IptablesError(f"can't read table {table} ({FAMILY_NAME[fam.family]}): "
                                f"{_strerror(fam, err)}")

    def close(self) -> None:
        if self.h:
            self.lib.iptc_free(self.h)
            self.h = None

    def chains(self) -> list[str]:
        out = []
        name = self.lib.iptc_first_chain(self.h)
        while name:
            out.append(name.decode())
            name = self.lib.iptc_next_chain(self.h)
        return out

    def targets(self, chain: str) -> list[str]:
        """The target name of each rule, cheaply (no entry copy)."""
        out = []
        p = self.lib.iptc_first_rule(chain.encode(), self.h)
        while p:
            out.append((self.lib.iptc_get_target(p, self.h) or b"").decode())
            p = self.lib.iptc_next_rule(p, self.h)
        return out

    def rules(self, chain: str, only: frozenset[int] | None = None) -> list[tuple[int, _KRule]]:
        """(position, rule) of each rule of `chain`, or of the positions in `only`."""
        out = []
        fam, lib, h = self.fam, self.lib, self.h
        p = lib.iptc_first_rule(chain.encode(), h)
        pos = 0
        while p:
            if only is None or pos in only:
                e = ct.string_at(p, p.contents.next_offset)
                target = (lib.iptc_get_target(p, h) or b"").decode()
                toff = _U16.unpack_from(e, fam.off_target)[0]
                standard = e[toff + 2] == 0  # libiptc keeps verdicts and jumps nameless
                out.append((pos, _KRule(e, target, standard, _entry_key(fam, e, target, standard))))
            p = lib.iptc_next_rule(p, h)
            pos += 1
        return out

    def _check(self, rv: int, what: str) -> None:
        if rv != 1:
            err = _errno()
            raise IptablesError(f"{what} in {self.table} ({FAMILY_NAME[self.fam.family]}): "
                                f"{_strerror(self.fam, err)}")

    def create_chain(self, chain: str) -> None:
        self._check(self.lib.iptc_create_chain(chain.encode(), self.h), f"create chain {chain}")

    def flush(self, chain: str) -> None:
        self._check(self.lib.iptc_flush_entries(chain.encode(), self.h), f"flush chain {chain}")

    def delete_chain(self, chain: str) -> None:
        self._check(self.lib.iptc_delete_chain(chain.encode(), self.h), f"delete chain {chain}")

    def append(self, chain: str, entry: bytes) -> None:
        buf = (ct.c_ubyte * len(entry)).from_buffer_copy(entry)
        self._check(self.lib.iptc_append_entry(chain.encode(), buf, self.h), f"append to {chain}")

    def insert(self, chain: str, entry: bytes, position: int) -> None:
        buf = (ct.c_ubyte * len(entry)).from_buffer_copy(entry)
        self._check(self.lib.iptc_insert_entry(chain.encode(), buf, ct.c_uint(position), self.h),
                    f"insert into {chain}")

    def delete_at(self, chain: str, position: int) -> None:
        self._check(self.lib.iptc_delete_num_entry(chain.encode(), ct.c_uint(position), self.h),
                    f"delete rule {position + 1} of {chain}")

    def commit(self) -> None:
        if self.lib.iptc_commit(self.h) != 1:
            err = _errno()
            if err == errno.EAGAIN:
                raise _Retry(f"commit {self.table}: {_strerror(self.fam, err)}")
            raise IptablesError(f"commit {self.table} ({FAMILY_NAME[self.fam.family]}): "
                                f"{_strerror(self.fam, err)}")


@contextmanager
def _open(fam: _Family, table: str) -> Iterator[_Handle]:
    h = _Handle(fam, table)
    try:
        yield h
    finally:
        h.close()


@contextmanager
def _xtables_lock() -> Iterator[None]:
    """The flock iptables-legacy takes on /run/xtables.lock, waited for up to LOCK_WAIT."""
    timeout = LOCK_WAIT
    try:
        fd = os.open(LOCK_PATH, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        # e.g. /run read-only (ProtectSystem=strict) and iptables never ran: without the lock a
        # concurrent iptables -A could be lost, so refuse rather than write unlocked.
        raise IptablesError(f"can't open {LOCK_PATH}: {e.strerror}") from None
    try:
        deadline = time.monotonic() + timeout
        pause = 0.001
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise IptablesTransient(f"{LOCK_PATH} held by another program for "
                                            f"{timeout:g}s") from None
                time.sleep(pause)
                pause = min(pause * 2, 0.05)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


# ---- observe, compare, apply ---------------------------------------------------------------

@dataclass
class _Observed:
    """Our part of one table, as one libiptc handle shows it."""

    chains: dict[str, list[_KRule]]                      # TAGROUTED-* chain -> its rules
    refs: dict[str, list[tuple[int, _KRule]]]            # built-in -> rules jumping to TAGROUTED-*
    all_chains: list[str]


def _owned_names(table: str) -> frozenset[str]:
    """Exactly TAGROUTED-<BUILTIN> for this table's built-in chains: a user's TAGROUTED-CUSTOM
    shares our prefix but is not ours (`down` once deleted it)."""
    return frozenset(owned_chain_name(b) for b in BUILTIN_CHAINS.get(table, ()))


def _observe(h: _Handle) -> _Observed:
    builtins = set(BUILTIN_CHAINS.get(h.table, ()))
    owned = _owned_names(h.table)
    chains: dict[str, list[_KRule]] = {}
    refs: dict[str, list[tuple[int, _KRule]]] = {}
    names = h.chains()
    for name in names:
        if name in owned:
            chains[name] = [r for _, r in h.rules(name)]
        elif name in builtins:
            ours = frozenset(i for i, t in enumerate(h.targets(name)) if t in owned)
            if ours:
                refs[name] = h.rules(name, ours)
    return _Observed(chains, refs, names)


def _jumps(obs: _Observed) -> dict[str, tuple[int, ...]]:
    jumps: dict[str, tuple[int, ...]] = {}
    for builtin, refs in obs.refs.items():
        positions = tuple(pos for pos, r in refs if r.target == owned_chain_name(builtin))
        if positions:
            jumps[builtin] = positions
    return jumps


def _kernel_table(fam: _Family, table: str, obs: _Observed) -> KernelTable:
    items = [(r.entry, r.target, r.standard, r.key) for rules in obs.chains.values() for r in rules]
    decoded = iter(_decode_keys(fam, items))
    chains = {name: tuple(next(decoded) for _ in rules) for name, rules in obs.chains.items()}
    return KernelTable(fam.family, table, chains, _jumps(obs))  # type: ignore[arg-type]


def _views(fam: _Family, table: str, desired: tuple[OwnedChain, ...],
           obs: _Observed) -> tuple[tuple[OwnedChain, ...], KernelTable]:
    """Both sides of the comparison, decoding no more than the answer needs.

    Where a kernel entry equals the entry built for the desired rule at its position, both
    sides hold that rule as given; where they differ, both hold canonical forms (the desired
    rule built and decoded, the kernel entry decoded). Chains of different lengths and chains
    the kernel lacks differ whatever their rules say: only kernel entries nobody built are
    decoded for them. Chains we no longer want are removed unread (their rules left out)."""
    want: list[OwnedChain] = []
    todo: list[tuple[bytes, str, bool, bytes]] = []
    # kernel chain -> per position: the FirewallRule, or the key to decode
    staged: dict[str, list[FirewallRule | bytes]] = {}
    for c in desired:
        have = obs.chains.get(c.name)
        if have is None:
            want.append(c)
            continue
        built = [_build(r, fam.family) for r in c.rules]
        if len(have) != len(c.rules):
            by_key = {b.key: r for b, r in zip(built, c.rules, strict=True)}
            want.append(c)
            staged[c.name] = [by_key.get(k.key, k.key) for k in have]
            todo += [(k.entry, k.target, k.standard, k.key) for k in have if k.key not in by_key]
            continue
        w: list[FirewallRule] = []
        staged[c.name] = []
        for r, b, k in zip(c.rules, built, have, strict=True):
            if b.key == k.key:
                w.append(r)
                staged[c.name].append(r)
            else:
                w.append(canonical(r, fam.family))
                staged[c.name].append(k.key)
                todo.append((k.entry, k.target, k.standard, k.key))
        want.append(OwnedChain(c.family, c.table, c.builtin, tuple(w)))
    for name in obs.chains:
        if name not in staged:
            staged[name] = []  # a chain we remove: its rules are not compared, so not decoded
    decoded = dict(zip((item[3] for item in todo), _decode_keys(fam, todo), strict=True))
    kernel_chains = {name: tuple(decoded[x] if isinstance(x, bytes) else x for x in rules)
                     for name, rules in staged.items()}
    return tuple(want), KernelTable(fam.family, table, kernel_chains, _jumps(obs))  # type: ignore[arg-type]


def _jump_exact(fam: _Family, builtin: str, obs: _Observed) -> bool:
    """Exactly one rule of `builtin` jumps to our chain: the first, and it is our jump rule."""
    refs = [(pos, r) for pos, r in obs.refs.get(builtin, []) if r.target == owned_chain_name(builtin)]
    return (len(refs) == 1 and refs[0][0] == 0
            and refs[0][1].key == _build(_jump_rule(builtin), fam.family).key)


def _in_sync(fam: _Family, desired: tuple[OwnedChain, ...], obs: _Observed) -> bool:
    """Byte-level check, no decoding: every chain holds exactly the entries we would write."""
    if set(obs.chains) != {c.name for c in desired}:
        return False
    for chain in desired:
        have = obs.chains[chain.name]
        if len(have) != len(chain.rules):
            return False
        if any(k.key != _build(r, fam.family).key for k, r in zip(have, chain.rules, strict=True)):
            return False
        if not _jump_exact(fam, chain.builtin, obs):
            return False
    return True


def _validate(family: Family, table: str, desired: tuple[OwnedChain, ...]) -> None:
    if family not in (4, 6):
        raise ValueError(f"family must be 4 or 6, not {family!r}")
    if table not in BUILTIN_CHAINS:
        raise ValueError(f"table must be one of {sorted(BUILTIN_CHAINS)}, not {table!r}")
    seen = set()
    for chain in desired:
        if chain.family != family or chain.table != table:
            raise ValueError(f"{chain.name} is for {chain.table} IPv{chain.family}, "
                             f"not {table} IPv{family}")
        if chain.builtin not in BUILTIN_CHAINS[table]:
            raise ValueError(f"{table} has no built-in chain {chain.builtin}")
        if chain.name in seen:
            raise ValueError(f"{chain.name} given twice")
        seen.add(chain.name)


def _attempt(fam: _Family, table: str, desired: tuple[OwnedChain, ...], dry_run: bool) -> list[Change]:
    with _open(fam, table) as h:
        obs = _observe(h)
        if _in_sync(fam, desired, obs):
            return []
        want, kernel = _views(fam, table, desired, obs)
        changes = chain_changes(want, kernel)
        where = f"({table}, {FAMILY_NAME[fam.family]})"
        fix_jump = {c.name for c in desired if not _jump_exact(fam, c.builtin, obs)}
        for chain in desired:
            if chain.name in fix_jump and kernel.jumps.get(chain.builtin, ()) == (0,):
                changes.append(Change("replaced", "jump",
                                      f"replaced jump {chain.builtin} -> {chain.name} {where}: "
                                      f"the first rule is not the tagrouted jump"))
        if not changes or dry_run:
            return changes
        _apply(h, fam, desired, want, kernel, obs, fix_jump)
        h.commit()
        return changes


def _apply(h: _Handle, fam: _Family, desired: tuple[OwnedChain, ...], want: tuple[OwnedChain, ...],
           kernel: KernelTable, obs: _Observed, fix_jump: set[str]) -> None:
    """Stage every change in the handle; the caller commits them as one."""
    wanted = {c.name for c in desired}
    doomed = [name for name in obs.chains if name not in wanted]
    for name in doomed:
        h.flush(name)
    # Rules to delete, per chain, by position as observed: jumps we re-insert, strays, and every
    # reference to a chain about to go (else libiptc refuses to delete it).
    deletions: dict[str, set[int]] = {}
    for chain in desired:
        if chain.name in fix_jump:
            for pos, r in obs.refs.get(chain.builtin, []):
                if r.target == chain.name:
                    deletions.setdefault(chain.builtin, set()).add(pos)
    if doomed:
        owned = _owned_names(h.table)
        for name in obs.all_chains:
            if name in owned:
                continue  # ours: flushed or rewritten whole
            for pos, target in enumerate(h.targets(name)):
                if target in doomed:
                    deletions.setdefault(name, set()).add(pos)
    for name, positions in deletions.items():
        for pos in sorted(positions, reverse=True):
            h.delete_at(name, pos)
    for chain, canon in zip(desired, want, strict=True):
        if chain.name not in obs.chains:
            h.create_chain(chain.name)
        elif kernel.chains.get(chain.name) == canon.rules:
            continue
        else:
            h.flush(chain.name)
        for rule in chain.rules:
            h.append(chain.name, _build(rule, fam.family).entry)
    for chain in desired:
        if chain.name in fix_jump:
            h.insert(chain.builtin, _build(_jump_rule(chain.builtin), fam.family).entry, 0)
    for name in doomed:
        h.delete_chain(name)


def _table_present(family: Family, table: str) -> bool:
    """Whether the namespace has instantiated this legacy table. Reading a table makes the
    kernel instantiate it (and hook it into every packet's path), so a table nothing of ours
    can be in is never opened: not by `down`, not by a read."""
    names = "/proc/net/ip_tables_names" if family == 4 else "/proc/net/ip6_tables_names"
    try:
        with open(names) as f:
            return table in f.read().split()
    except FileNotFoundError:
        return False  # the legacy module is not even loaded


# ---- the interface -------------------------------------------------------------------------

def sync_table(family: Family, table: str, desired: tuple[OwnedChain, ...], *,
               dry_run: bool = False) -> list[Change]:
    """Make our chains and jumps in one table of one family equal `desired`; return the changes
    (none when in sync: then nothing is written and counters survive). One libiptc commit under
    /run/xtables.lock; retried with doubling backoff when the commit races another writer."""
    desired = tuple(desired)
    _validate(family, table, desired)
    if not desired and not _table_present(family, table):
        return []
    pause = FIRST_BACKOFF
    last = ""
    for attempt in range(ATTEMPTS):
        try:
            with _lock:
                fam = _family(family)
                if dry_run:
                    return _attempt(fam, table, desired, dry_run=True)
                with _xtables_lock():
                    return _attempt(fam, table, desired, dry_run=False)
        except _Retry as e:
            last = str(e)
            log.debug("%s (%s): attempt %d raced another writer: %s",
                      table, FAMILY_NAME[family], attempt + 1, e)
        except _NoTable:
            if not desired:
                return []  # nothing of ours can be in a table the kernel does not have
            raise
        time.sleep(pause)
        pause *= 2
    raise IptablesTransient(f"{table} ({FAMILY_NAME[family]}): gave up after {ATTEMPTS} attempts: {last}")


def read_table(family: Family, table: str) -> KernelTable:
    """Our TAGROUTED-* chains (canonical rules) and the jump positions per built-in chain."""
    _validate(family, table, ())
    if not _table_present(family, table):
        return KernelTable(family, table)
    for _ in range(ATTEMPTS):
        try:
            with _lock:
                fam = _family(family)
                with _open(fam, table) as h:
                    return _kernel_table(fam, table, _observe(h))
        except _Retry:
            time.sleep(FIRST_BACKOFF)
        except _NoTable:
            return KernelTable(family, table)
    raise IptablesTransient(f"{table} ({FAMILY_NAME[family]}): kept changing while read")


def remove_all(family: Family, table: str) -> list[Change]:
    """Remove every TAGROUTED-* chain and every jump to one from the table (for `down`)."""
    return sync_table(family, table, ())


def iptables_command_is_nft() -> bool:
    """True when `iptables` on PATH is the nf_tables variant: its rules are not the ones we
    keep (ours live in the legacy tables), worth one warning."""
    exe = shutil.which("iptables")
    if exe is None:
        return False
    try:
        out = subprocess.run([exe, "-V"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "(nf_tables)" in (out.stdout + out.stderr)


# ---- counters ------------------------------------------------------------------------------

_COUNTERS = struct.Struct("=QQ")  # struct xt_counters: pcnt, bcnt


def read_counters(intent: FirewallIntent) -> dict[str, tuple[int, int] | None]:
    """service name -> (packets, bytes) summed over its counted rules (core.iptables_rules
    .counted_rules) in the kernel now; None for a service without per-service rules or whose
    rules are not (yet) there. A kernel rule is a service's when its entry key equals the key
    of the rule we would write (the comparison sync_table itself uses)."""
    return _summed(counted_rules(intent))


def read_path_counters(intent: FirewallIntent) -> dict[str, dict[str, tuple[int, int] | None]]:
    """path name -> {"requests": (packets, bytes), "replies": ...} from the rules that tag and
    route the path's traffic (core.iptables_rules.path_counted_rules); None where not there."""
    wanted = path_counted_rules(intent)
    flat = _summed({(path, what): rules for path, kinds in wanted.items() for what, rules in kinds.items()})
    return {path: {what: flat[(path, what)] for what in kinds} for path, kinds in wanted.items()}


def read_policy_counters(intent: FirewallIntent) -> dict[str, dict[str, tuple[int, int] | None]]:
    """service name -> {"dropped"|"limited": (packets, bytes) or None}, for the services with an
    allow_from or rate_limit (core.iptables_rules.policy_rules)."""
    wanted = policy_rules(intent)
    flat = _summed({(name, kind): rules for name, kinds in wanted.items() for kind, rules in kinds.items()})
    return {name: {kind: flat[(name, kind)] for kind in kinds} for name, kinds in wanted.items()}


def _summed(wanted: dict[Any, tuple[CountedRule, ...]]) -> dict[Any, tuple[int, int] | None]:
    """Each key's rules' counters in the kernel now, summed; None when none of them is there."""
    by_table: dict[tuple[Family, str], set[str]] = {}
    for rules in wanted.values():
        for family, table, chain, _ in rules:
            by_table.setdefault((family, table), set()).add(chain)
    # (family, chain, key) -> [packets, bytes], summed over equal rules
    kernel: dict[tuple[Family, str, bytes], list[int]] = {}
    for (family, table), chains in by_table.items():
        _read_counters(family, table, chains, kernel)
    out: dict[Any, tuple[int, int] | None] = {}
    for name, rules in wanted.items():
        hits = [kernel.get((family, chain, _build(rule, family).key)) for family, _, chain, rule in rules]
        seen = [h for h in hits if h is not None]
        out[name] = (sum(h[0] for h in seen), sum(h[1] for h in seen)) if seen else None
    return out


def _read_counters(family: Family, table: str, chains: set[str],
                   into: dict[tuple[Family, str, bytes], list[int]]) -> None:
    if not _table_present(family, table):
        return
    with _lock:
        fam = _family(family)
        try:
            with _open(fam, table) as h:
                present = set(h.chains())
                off = fam.entry_cls.counters.offset
                for chain in chains & present:
                    for _pos, krule in h.rules(chain):
                        pcnt, bcnt = _COUNTERS.unpack_from(krule.entry, off)
                        slot = into.setdefault((family, chain, krule.key), [0, 0])
                        slot[0] += pcnt
                        slot[1] += bcnt
        except (IptablesError, _Retry):
            return  # no such table, or it changed under us: no counters this time


# ---- the host's own legacy tables (kernel/hostfw.py): read them, keep our HOSTFW accepts ----

def _policy(h: _Handle, chain: str) -> str | None:
    counters = ct.create_string_buffer(_COUNTERS.size)
    name = h.lib.iptc_get_policy(chain.encode(), counters, h.h)
    return name.decode() if name else None


def save_text(family: Family, table: str) -> str | None:
    """One legacy table as iptables-save prints it (rules decoded with the extensions' own save,
    counters left out); None when the namespace has not instantiated it (then it is never
    opened: opening one creates it)."""
    if not _table_present(family, table):
        return None
    for _ in range(ATTEMPTS):
        try:
            with _lock:
                fam = _family(family)
                with _open(fam, table) as h:
                    names = h.chains()
                    lines = [f"*{table}"]
                    lines += [f":{n} {_policy(h, n) or '-'} [0:0]" for n in names]
                    for name in names:
                        rules = [r for _, r in h.rules(name)]
                        decoded = _decode_keys(fam, [(r.entry, r.target, r.standard, r.key) for r in rules])
                        lines += [f"-A {name} {r.save_args()}" for r in decoded]
                    lines.append("COMMIT")
                    return "\n".join(lines) + "\n"
        except _Retry:
            time.sleep(FIRST_BACKOFF)
        except _NoTable:
            return None
    raise IptablesTransient(f"{table} ({FAMILY_NAME[family]}): kept changing while read")


def sync_accept_chain(family: Family, chain: str, rules: tuple[FirewallRule, ...], parent: str,
                      jump: FirewallRule, *, dry_run: bool = False) -> list[Change]:
    """Make the legacy filter table hold `chain` with exactly `rules` and one `jump` to it, first
    in `parent` (with no rules: neither the chain nor any jump to it). Everything else in the
    table stays as it is; one libiptc commit under /run/xtables.lock, only when something
    differs. A table the namespace has not instantiated is left alone."""
    if not _table_present(family, "filter"):
        return []
    pause = FIRST_BACKOFF
    last = ""
    for _ in range(ATTEMPTS):
        try:
            with _lock:
                lock = contextlib.nullcontext() if dry_run else _xtables_lock()
                with lock, _open(_family(family), "filter") as h:
                    return _accept_chain(h, family, chain, rules, parent, jump, dry_run)
        except _Retry as e:
            last = str(e)
        except _NoTable:
            return []
        time.sleep(pause)
        pause *= 2
    raise IptablesTransient(f"filter ({FAMILY_NAME[family]}): gave up after {ATTEMPTS} attempts: {last}")


def _accept_chain(h: _Handle, family: Family, chain: str, rules: tuple[FirewallRule, ...], parent: str,
                  jump: FirewallRule, dry_run: bool) -> list[Change]:
    where = f"(filter, {FAMILY_NAME[family]}, legacy)"
    names = h.chains()
    if rules and parent not in names:
        raise IptablesError(f"no chain {parent} {where}")
    present = chain in names
    have = [r.key for _, r in h.rules(chain)] if present else []
    want = [_build(r, family).key for r in rules]
    jump_key = _build(jump, family).key
    jumps: list[tuple[str, int, bool]] = []
    for name in names:
        at = frozenset(i for i, t in enumerate(h.targets(name)) if t == chain) if name != chain else None
        if at:
            jumps += [(name, pos, r.key == jump_key) for pos, r in h.rules(name, at)]
    keep = (parent, 0, True) if rules and (parent, 0, True) in jumps else None
    chain_ok = (present == bool(rules)) and have == want
    stray = [j for j in jumps if j != keep]
    if chain_ok and not stray and (keep is not None or not rules):
        return []
    changes: list[Change] = []
    if rules and not chain_ok:
        verb = "added" if not present else "replaced"
        changes.append(Change(verb, "chain", f"{verb} chain {chain} {where}: "  # type: ignore[arg-type]
                                             f"{len(rules)} accepts for our traffic"))
    changes += [Change("removed", "jump", f"removed jump {name} -> {chain} (rule {pos + 1}) {where}")
                for name, pos, _exact in stray]
    if rules and keep is None:
        changes.append(Change("added", "jump", f"added jump {parent} -> {chain} {where}"))
    if not rules and present:
        changes.append(Change("removed", "chain", f"removed chain {chain} {where}"))
    if dry_run:
        return changes
    for name, pos, _exact in sorted(stray, key=lambda j: (j[0], -j[1])):
        h.delete_at(name, pos)
    if rules:
        if not present:
            h.create_chain(chain)
        elif not chain_ok:
            h.flush(chain)
        for rule in rules if not chain_ok else ():
            h.append(chain, _build(rule, family).entry)
        if keep is None:
            h.insert(parent, _build(jump, family).entry, 0)
    elif present:
        h.flush(chain)
        h.delete_chain(chain)
    h.commit()
    return changes


# ---- the backend ---------------------------------------------------------------------------

def _where(family: Family, table: str) -> str:
    return f"[{table} {FAMILY_NAME[family]}]"


def chain_drift_lines(family: Family, table: str, desired: tuple[OwnedChain, ...]) -> list[str]:
    """`tagroutectl diff` lines for one table of one family, in iptables-save syntax."""
    kernel = read_table(family, table)
    where = _where(family, table)
    lines: list[str] = []
    wanted = {c.name for c in desired}
    for chain in desired:
        want = tuple(canonical(r, family) for r in chain.rules)
        have = kernel.chains.get(chain.name)
        if have is None:
            lines.append(f"+{where} :{chain.name} - [0:0]")
            have = ()
        if have != want:
            lines += [f"-{where} -A {chain.name} {r.save_args()}" for r in have if r not in want]
            lines += [f"+{where} -A {chain.name} {r.save_args()}" for r in want if r not in have]
            if set(have) == set(want):
                lines.append(f"~{where} rules of {chain.name} in the wrong order or duplicated")
        if kernel.jumps.get(chain.builtin, ()) != (0,):
            lines.append(f"+{where} {jump_line(chain)} (exactly once, first)")
    for name, rules in sorted(kernel.chains.items()):
        if name not in wanted:
            lines += [f"-{where} -A {name} {r.save_args()}" for r in rules]
            lines.append(f"-{where} :{name} - [0:0]")
    return lines


class LegacyBackend:
    """The iptables-legacy backend behind the firewall interface: each table of each family is
    synced on its own (one libiptc commit each); a table that fails does not stop the others."""

    name = IPTABLES_LEGACY

    def _tables(self, intent: FirewallIntent) -> Iterator[tuple[Family, str, tuple[OwnedChain, ...]]]:
        chains = legacy_chains(intent)
        for family in (4, 6):
            for table in TABLE_ORDER:
                yield family, table, tuple(c for c in chains if c.family == family and c.table == table)  # type: ignore[misc]

    def sync(self, intent: FirewallIntent, *, dry_run: bool = False) -> FirewallSync:
        result = FirewallSync()
        for family, table, chains in self._tables(intent):
            try:
                changes = sync_table(family, table, chains, dry_run=dry_run)
            except Exception as e:
                result.errors.append(f"{table} ({FAMILY_NAME[family]}): {e}")
                continue
            result.changes += changes
            if table == "nat" and changes:
                result.dnat_changed.add(family)
        return result

    def drift_lines(self, intent: FirewallIntent) -> list[str]:
        return [line for family, table, chains in self._tables(intent)
                for line in chain_drift_lines(family, table, chains)]

    def counters(self, intent: FirewallIntent) -> Counters:
        return Counters(read_counters(intent), read_path_counters(intent), read_policy_counters(intent))

    def holds_state(self) -> bool:
        for family in (4, 6):
            for table in TABLE_ORDER:
                kernel = read_table(family, table)  # type: ignore[arg-type]
                if kernel.chains or kernel.jumps:
                    return True
        return False

    def close(self) -> None:
        pass
