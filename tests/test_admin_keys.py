"""The keys of the restricted APIs without a server: files created exclusively, values in no repr, exposure read
from the proc mount. With the real server: tests/test_launcher.py (each key opens its own group) and
tests/test_k8s.py (the container entry point)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from posetriton.server.admin_keys import (
    CONTROL_APIS,
    SHARED_MEMORY_APIS,
    AdminKey,
    AdminKeys,
    KeyFileError,
    command_line_exposure,
    read_shared_memory_key,
)
from posetriton.server.launcher import ServerOptions, TritonServer


def test_key_values_appear_in_no_repr() -> None:
    keys = AdminKeys.generate()
    server = TritonServer(ServerOptions(repository=Path("nowhere")))
    texts = [repr(keys), str(keys), repr(keys.control), str(keys.shared_memory), f"{keys.control}", repr(server)]
    texts += [repr(server.options), server.restricted_apis_notice()]
    for value in (*keys.values, *server.admin_keys.values):
        assert len(value) == 64
        assert all(value not in text for text in texts), texts
    assert "value=<hidden>" in repr(keys.control)
    assert keys.control.apis == CONTROL_APIS and keys.shared_memory.apis == SHARED_MEMORY_APIS
    assert keys.control.value != keys.shared_memory.value and keys.control.name != keys.shared_memory.name
    assert set(CONTROL_APIS).isdisjoint(SHARED_MEMORY_APIS), "Triton allows each API in one group only"


def test_key_files_are_private_and_read_back(tmp_path: Path) -> None:
    keys = AdminKeys.generate()
    folder = tmp_path / "keys"
    keys.shared_memory.write(folder / "shm-key")
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700, "a missing folder is made private"
    assert stat.S_IMODE(os.stat(folder / "shm-key").st_mode) == 0o600
    assert read_shared_memory_key(folder / "shm-key") == keys.shared_memory
    assert AdminKey.read(folder / "shm-key").apis == CONTROL_APIS, "read() defaults to the control group"


def test_a_pre_placed_symlink_is_refused_and_not_followed(tmp_path: Path) -> None:
    key = AdminKey.generate()
    target = tmp_path / "elsewhere"
    target.write_text("someone else's file\n")
    link = tmp_path / "control-key"
    link.symlink_to(target)
    for replace_own in (False, True):  # not even the container's "replace my own stale key" follows or removes it
        with pytest.raises(KeyFileError, match="already exists \\(a symlink\\); refusing"):
            key.write(link, replace_own=replace_own)
    assert target.read_text() == "someone else's file\n" and link.is_symlink()
    dangling = tmp_path / "shm-key"
    dangling.symlink_to(tmp_path / "would-be-created")
    with pytest.raises(KeyFileError, match="symlink"):
        key.write(dangling)
    assert not (tmp_path / "would-be-created").exists(), "O_NOFOLLOW: no file made where the link points"


def test_an_existing_file_is_refused_unless_it_is_our_own_stale_key(tmp_path: Path) -> None:
    old, new = AdminKey.generate(), AdminKey.generate()
    path = tmp_path / "control-key"
    old.write(path)
    with pytest.raises(KeyFileError, match="already exists \\(a file\\)"):
        new.write(path)
    assert AdminKey.read(path) == old
    new.write(path, replace_own=True)  # a container restarted on the same pod volume
    assert AdminKey.read(path) == new and stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_a_folder_others_may_write_to_is_refused(tmp_path: Path) -> None:
    public = tmp_path / "public"
    public.mkdir()
    public.chmod(0o777)
    with pytest.raises(KeyFileError, match="writable by others"):
        AdminKey.generate().write(public / "control-key")
    assert not (public / "control-key").exists()
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "linked").symlink_to(tmp_path / "real")
    with pytest.raises(KeyFileError, match="not a directory"):
        AdminKey.generate().write(tmp_path / "linked" / "control-key")


_PROC = "22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc {}\n"
_ROOT = "21 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"


def test_command_line_exposure_reads_the_proc_mount() -> None:
    open_proc = command_line_exposure(_ROOT + _PROC.format("rw"))
    assert "every local user can read them" in open_proc and "hidepid=invisible" in open_proc
    for option in ("hidepid=2", "hidepid=invisible", "hidepid=1", "hidepid=ptraceable"):
        hidden = command_line_exposure(_ROOT + _PROC.format(f"rw,{option}"))
        assert f"mounted with {option}" in hidden and "this user and root only" in hidden, hidden
    with_group = command_line_exposure(_PROC.format("rw,gid=27,hidepid=2"))
    assert "members of group 27" in with_group
    assert "every local user" in command_line_exposure(_PROC.format("rw,hidepid=0"))
    # This machine's own answer is one of the two.
    assert "hidepid" in command_line_exposure()
