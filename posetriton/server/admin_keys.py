"""The secrets that open Triton's restricted APIs: one key for model control, another for shared memory.

Triton 2.51 reads a restricted-protocol key from its command line only (``--grpc-restricted-protocol``
and ``--http-restricted-api``; neither a file nor an environment variable), so the value is in
``/proc/PID/cmdline`` of ``tritonserver`` for as long as it runs. Who can read that is the operating
system's business: the file's owner, root, and, unless ``/proc`` is mounted with ``hidepid``, every
local user (``ps -ef``). :func:`command_line_exposure` says which of these holds on this machine;
docs/reliability.md ("Admin keys") and k8s/README.md say how the pod contains it.

Two keys, so that handing a client what it needs to register system shared memory does not also
hand it model loading (which runs a model's Python code in the server):

* the **control key** opens ``model-repository``, ``logging`` and ``trace`` (the launcher's and the
  container entry point's stub watchdog send it for their reloads);
* the **shared-memory key** opens ``shared-memory`` (clients on the same host that pass tensors
  through ``/dev/shm``).

Key values never appear in a repr, a message or a log line written here; files that carry them are
created exclusively (no symlink followed, no file replaced that another user placed), mode 0600.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

# Loading a model runs its Python code in the server; logging and trace settings change what the
# server writes. Shared memory maps memory by name. Inference, health, metadata, model configuration
# and statistics stay open to clients.
CONTROL_APIS = ("model-repository", "logging", "trace")
SHARED_MEMORY_APIS = ("shared-memory",)
CONTROL_HEADER = "posetriton-control-key"
SHARED_MEMORY_HEADER = "posetriton-shm-key"
# Triton prefixes the header name of --grpc-restricted-protocol with this in the gRPC metadata it expects.
GRPC_RESTRICTED_PREFIX = "triton-grpc-protocol-"
# hidepid values of a proc mount under which other users cannot read a process's command line
# (1/noaccess: its /proc/PID is closed; 2/invisible: not even listed; 4/ptraceable: only what they may trace).
_HIDING_PIDS = {"1", "2", "4", "noaccess", "invisible", "ptraceable"}


class KeyFileError(OSError):
    """A key file could not be created safely (a symlink or another user's file in the way, a public folder)."""


@dataclass(frozen=True)
class AdminKey:
    """The secret one group of restricted APIs expects in the header ``name``, made at a server's start."""

    value: str = field(repr=False)
    apis: tuple[str, ...] = CONTROL_APIS
    name: str = CONTROL_HEADER

    @classmethod
    def generate(cls, apis: tuple[str, ...] = CONTROL_APIS, name: str = CONTROL_HEADER) -> AdminKey:
        return cls(secrets.token_hex(32), apis, name)

    def __repr__(self) -> str:
        return f"AdminKey(apis={self.apis!r}, name={self.name!r}, value=<hidden>)"

    __str__ = __repr__

    def triton_args(self) -> list[str]:
        apis = ",".join(self.apis)
        return [
            f"--grpc-restricted-protocol={apis}:{self.name}={self.value}",
            f"--http-restricted-api={apis}:{self.name}={self.value}",
        ]

    def write(self, path: Path, replace_own: bool = False) -> None:
        """The value alone, in a new file readable by this user only; see :func:`create_private_file`."""
        create_private_file(path, (self.value + "\n").encode(), replace_own)

    @classmethod
    def read(cls, path: Path, apis: tuple[str, ...] = CONTROL_APIS, name: str = CONTROL_HEADER) -> AdminKey:
        return cls(path.read_text().strip(), apis, name)

    @property
    def http_headers(self) -> dict[str, str]:
        return {self.name: self.value}

    @property
    def grpc_header(self) -> str:
        """The gRPC metadata name Triton expects this key in."""
        return f"{GRPC_RESTRICTED_PREFIX}{self.name}"

    @property
    def grpc_headers(self) -> dict[str, str]:
        """For tritonclient / PoseClient ``headers=``: e.g. the shared-memory key to register system shared memory."""
        return {self.grpc_header: self.value}


@dataclass(frozen=True)
class AdminKeys:
    """The two keys of one server process: model control (with logging and trace) and shared memory."""

    control: AdminKey
    shared_memory: AdminKey

    @classmethod
    def generate(cls) -> AdminKeys:
        return cls(
            AdminKey.generate(CONTROL_APIS, CONTROL_HEADER),
            AdminKey.generate(SHARED_MEMORY_APIS, SHARED_MEMORY_HEADER),
        )

    def triton_args(self) -> list[str]:
        return [*self.control.triton_args(), *self.shared_memory.triton_args()]

    @property
    def values(self) -> tuple[str, str]:
        """Both secrets (for tests that check a text does not contain them)."""
        return self.control.value, self.shared_memory.value


def read_shared_memory_key(path: Path) -> AdminKey:
    """The shared-memory key a server wrote to ``path`` (``AdminKey.read`` with its APIs and header)."""
    return AdminKey.read(path, SHARED_MEMORY_APIS, SHARED_MEMORY_HEADER)


def _check_private_folder(folder: Path) -> None:
    """``folder`` exists, is a real directory of this user, and nobody else may write into it."""
    try:
        info = os.lstat(folder)
    except FileNotFoundError:
        folder.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # made meanwhile by someone: checked below like any other
            os.mkdir(folder, 0o700)
        info = os.lstat(folder)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise KeyFileError(errno.ENOTDIR, f"the key folder {folder} is not a directory (a symlink?); refusing it")
    if info.st_uid != os.getuid():
        raise KeyFileError(errno.EPERM, f"the key folder {folder} belongs to uid {info.st_uid}, not to this user")
    if info.st_mode & 0o022:
        raise KeyFileError(
            errno.EPERM,
            f"the key folder {folder} is writable by others (mode {stat.S_IMODE(info.st_mode):o}): "
            "they could replace a key file; use a folder only this user may write to",
        )


def create_private_file(path: Path, content: bytes, replace_own: bool = False) -> None:
    """Write ``content`` to a new file ``path``, mode 0600, with ``O_CREAT | O_EXCL | O_NOFOLLOW``.

    The folder is made (mode 0700) when missing and must belong to this user and be writable by it alone.
    Anything already at ``path`` is refused (a symlink always: following one would write the key where
    someone else points), unless ``replace_own`` and it is a regular file of this user: the key of an
    earlier start of the same container, on a volume that outlives the container.
    """
    path = Path(path)
    _check_private_folder(path.parent)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        info = os.lstat(path)
        own_file = stat.S_ISREG(info.st_mode) and info.st_uid == os.getuid()
        if not (replace_own and own_file):
            what = "a symlink" if stat.S_ISLNK(info.st_mode) else "a file" if own_file else "another user's file"
            raise KeyFileError(errno.EEXIST, f"{path} already exists ({what}); refusing to write a key there") from None
        os.unlink(path)  # unlink never follows a link; the new file is then created exclusively again
        fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(content)


def command_line_exposure(mountinfo: str | None = None) -> str:
    """Who on this machine can read a process's command line (``tritonserver``'s carries the keys).

    ``mountinfo`` is the text of ``/proc/self/mountinfo`` (read when None).
    """
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return "the keys are on tritonserver's command line; this platform does not say who can read it"
    options: list[str] | None = None
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) < 10 or fields[4] != "/proc" or "-" not in fields:
            continue
        dash = fields.index("-")
        if fields[dash + 1] == "proc":
            options = fields[dash + 3].split(",") + fields[5].split(",")
    hidepid = next((o.split("=", 1)[1] for o in options or [] if o.startswith("hidepid=")), None)
    group = next((o.split("=", 1)[1] for o in options or [] if o.startswith("gid=")), None)
    if hidepid in _HIDING_PIDS:
        also = f", root and members of group {group}" if group else " and root"
        return (
            f"/proc is mounted with hidepid={hidepid}: tritonserver's command line, which carries the keys, is "
            f"readable by this user{also} only"
        )
    return (
        "tritonserver's command line carries the keys (Triton reads them from nowhere else) and /proc is mounted "
        "without hidepid: every local user can read them (ps -ef). On a shared machine, remount /proc with "
        "hidepid=invisible (mount -o remount,hidepid=invisible /proc) or run the server in a container of its own"
    )
