"""The run directory (/run/tagrouted): where tagrouted keeps its record of what it owns.

Owns: opening the run directory only when it is ours, and the file primitives every writer of
it uses (the routing record, the saved sysctls, the daemon's lock). Never decides what goes in
the files; their owners (converge.RoutingRecord, sysctl.SavedSysctls) validate what they read
back, because a planted `tables.json` of [254] once made `apply` delete the main table.
Stdlib only (and core.config's bounded read): `tagroutectl status` checks the directory without
loading pyroute2 or libiptc.

What "ours" means, checked when a RunDir is opened:
- the run directory itself, and every component of the --run-dir path tagrouted creates, is a
  real directory (never a symlink), owned by root, mode 0700;
- every ancestor that already existed is owned by root and not writable by others (unless
  sticky, as /tmp): else another user could rename the run directory away and plant their own.
  Symlinks among those ancestors are resolved first (/var/run -> /run is fine).
Every later access is relative to the descriptor held open here (openat), so swapping a path
component after the check changes nothing.

Files inside: opened with O_NOFOLLOW (a planted symlink is refused, never followed: a
`tables.json.tmp` symlink once made `apply` truncate a root-only file), O_NONBLOCK (a FIFO never
stalls a pass), must be regular files, and are read up to MAX_RECORD_BYTES (a `/dev/zero`
behind the name once read until MemoryError). Writes go to a fresh temp file (O_CREAT|O_EXCL,
random name), fsync, rename over the old one, fsync the directory.

Threading: a RunDir holds one directory descriptor; its methods are safe from any thread
(each call opens and closes its own file descriptors). Serialising writers is the caller's
business (SavedSysctls takes an flock on a lock file opened through `open_lock`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat

from ..core.config import read_bounded

OWNER = 0  # root: the daemon and tagroutectl's writing commands run as root
MAX_RECORD_BYTES = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class RunDirError(Exception):
    """The run directory, or a file in it, is not one tagrouted can trust: the message says why."""


class NoRunDir(RunDirError):
    """The run directory does not exist (and was not to be created)."""


class RunDirDenied(RunDirError):
    """The caller may not enter the run directory (not root): nothing to check, nothing to do."""


def _mode(st: os.stat_result) -> str:
    return f"{stat.S_IMODE(st.st_mode):04o}"


def _check_ours(st: os.stat_result, path: str, owner: int) -> None:
    if not stat.S_ISDIR(st.st_mode):
        raise RunDirError(f"{path} is not a directory")
    if st.st_uid != owner or stat.S_IMODE(st.st_mode) != 0o700:
        who = "root" if owner == 0 else f"uid {owner}"
        raise RunDirError(
            f"{path}: a run directory must be owned by {who} with mode 0700, this one is owned by "
            f"uid {st.st_uid} with mode {_mode(st)}: another user could plant or read the record "
            f"of what tagrouted owns there (fix: chown {who} {path} && chmod 0700 {path}, or "
            "pick another --run-dir)")


def _check_ancestor(st: os.stat_result, path: str, owner: int) -> None:
    if st.st_uid not in (0, owner):
        raise RunDirError(f"{path} (above the run directory) is owned by uid {st.st_uid}: its owner "
                          "could replace the run directory; use a --run-dir under directories of root")
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise RunDirError(f"{path} (above the run directory) has mode {_mode(st)}: writable by others "
                          "without the sticky bit, so anyone could replace the run directory in it")


def open_run_dir(path: str, *, create: bool = True, owner: int = OWNER) -> int:
    """A descriptor of the run directory at `path`, after checking it is ours (see the module
    note); missing components are created 0700 when `create`. Raises RunDirError or NoRunDir."""
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    if not name:
        raise RunDirError("/ cannot be a run directory")
    parts = [p for p in os.path.realpath(parent).split("/") if p] + [name]
    fd = os.open("/", _DIR_FLAGS)
    try:
        _check_ancestor(os.fstat(fd), "/", owner)
        walked = ""
        for i, part in enumerate(parts):
            walked += "/" + part
            last = i == len(parts) - 1
            created = False
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise NoRunDir(f"{walked} does not exist") from None
                try:
                    os.mkdir(part, 0o700, dir_fd=fd)
                    created = True
                except FileExistsError:
                    pass  # made by someone else meanwhile: checked below like any other
                except OSError as e:  # a read-only file system, no permission
                    raise RunDirError(f"cannot create {walked}: {e.strerror}") from None
                child = _open_dir(part, fd, walked)
                if created:
                    os.fchmod(child, 0o700)  # whatever the umask said
            except OSError as e:
                raise _dir_refusal(e, part, fd, walked) from None
            os.close(fd)
            fd = child
            st = os.fstat(fd)
            if created or last:
                _check_ours(st, walked, owner)
            else:
                _check_ancestor(st, walked, owner)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _open_dir(part: str, dir_fd: int, walked: str) -> int:
    try:
        return os.open(part, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        raise _dir_refusal(e, part, dir_fd, walked) from None


def _dir_refusal(e: OSError, part: str, dir_fd: int, walked: str) -> Exception:
    if e.errno in (errno.ELOOP, errno.ENOTDIR):
        try:
            st = os.lstat(part, dir_fd=dir_fd)
        except OSError:
            st = None
        if st is not None and stat.S_ISLNK(st.st_mode):
            return RunDirError(f"{walked} is a symlink: tagrouted never follows one on the way to "
                               "its run directory (pick the real path as --run-dir)")
        return RunDirError(f"{walked} is not a directory")
    if e.errno == errno.EACCES:
        return RunDirDenied(f"{walked}: permission denied (only root may use the run directory)")
    return RunDirError(f"{walked}: {e.strerror}")


class RunDir:
    """An open, checked run directory; files are reached only through its descriptor."""

    def __init__(self, path: str, *, create: bool = True, owner: int = OWNER) -> None:
        self.path = os.path.abspath(path)
        self.fd = open_run_dir(self.path, create=create, owner=owner)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def file(self, name: str) -> str:
        """The path of `name` in the directory, for messages."""
        return os.path.join(self.path, name)

    def read(self, name: str, limit: int = MAX_RECORD_BYTES) -> bytes | None:
        """The bytes of regular file `name`, or None when it does not exist. RunDirError for a
        symlink, a FIFO or device, or a file over `limit` bytes."""
        try:
            fd = os.open(name, _READ_FLAGS, dir_fd=self.fd)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise self._file_refusal(e, name) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise RunDirError(f"{self.file(name)} is not a regular file: tagrouted only reads "
                                  "files it wrote; remove it")
            data = read_bounded(fd, limit)
            if len(data) > limit:
                raise RunDirError(f"{self.file(name)} is larger than {limit} bytes: not a file "
                                  "tagrouted wrote; remove it")
            return data
        finally:
            os.close(fd)

    def write(self, name: str, data: bytes) -> None:
        """Replace `name` atomically with `data` (mode 0600), surviving a crash at any point."""
        tmp = f".{name}.{secrets.token_hex(6)}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600, dir_fd=self.fd)
        try:
            try:
                os.fchmod(fd, 0o600)  # whatever the umask said
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=self.fd)
            raise
        os.fsync(self.fd)  # the rename itself survives a crash

    def open_lock(self, name: str) -> int:
        """A descriptor of lock file `name` (created 0600 when missing), for flock."""
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
        try:
            fd = os.open(name, flags, 0o600, dir_fd=self.fd)
        except OSError as e:
            raise self._file_refusal(e, name) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise RunDirError(f"{self.file(name)} is not a regular file: remove it")
        return fd

    def _file_refusal(self, e: OSError, name: str) -> Exception:
        if e.errno == errno.ELOOP:
            return RunDirError(f"{self.file(name)} is a symlink: tagrouted never follows one in its "
                               "run directory; remove it")
        return RunDirError(f"{self.file(name)}: {e.strerror}")
