"""hpc.atomic: a failed write is an OutputError (never an OSError a caller could take for a bad
input), leaves no temp file and keeps the previous version of the file."""
import errno
import os
import subprocess
from pathlib import Path

import pytest

from hpc.atomic import OutputError, atomic_path, atomic_write_bytes, atomic_write_text, check_free_space


def test_a_temp_file_removed_under_the_writer_is_an_output_error_and_the_old_file_stays(tmp_path):
    target = tmp_path / "shard.h5"
    target.write_text("previous version")
    with pytest.raises(OutputError, match=r"cannot write .*shard\.h5") as err:
        with atomic_path(target) as tmp:
            tmp.write_text("new")
            tmp.unlink()  # another job's clean-up, before the issue-18 lock
    assert not isinstance(err.value, OSError) and err.value.errno == errno.ENOENT
    assert target.read_text() == "previous version" and [p.name for p in tmp_path.iterdir()] == ["shard.h5"]


def test_an_unwritable_folder_is_an_output_error(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OutputError, match="cannot write"):
        atomic_write_text(tmp_path / "file" / "x.json", "{}")


def test_a_full_disk_is_said_before_the_first_byte(tmp_path):
    with pytest.raises(OutputError, match="No space left on device: needs") as err:
        check_free_space(tmp_path / "big.bin", 1 << 62)
    assert err.value.errno == errno.ENOSPC and not (tmp_path / "big.bin").exists()


def test_on_a_real_full_tmpfs_nothing_half_written_stays(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"needs root to mount a small tmpfs (CI runs as root): {r.stderr.strip()}")
    try:
        atomic_write_bytes(disk / "a.bin", b"a" * 40_000)
        with pytest.raises(OutputError, match="No space left"):
            atomic_write_bytes(disk / "b.bin", b"b" * 40_000)
        with pytest.raises(OutputError, match="No space left"):  # the write itself fails: past the check
            with atomic_path(disk / "c.bin") as tmp:
                with open(tmp, "wb") as f:
                    f.write(b"c" * 40_000)
        assert sorted(os.listdir(disk)) == ["a.bin"] and (disk / "a.bin").read_bytes() == b"a" * 40_000
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
