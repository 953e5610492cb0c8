"""manifest.json rows as dataclasses: an old manifest loads, is rewritten byte for byte, and a
row that does not fit the schema is one clear error naming the file and the row."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from preprocessing.config import DataConfig
from preprocessing.manifest import ShardRow, SubjectRow, load_manifest, write_manifest

# written by `udean preprocess` before rows were dataclasses (commit 9894fc2, misaligned mode,
# tiny config, one unreadable input): the JSON format every existing data set has
OLD = Path(__file__).parent / "data" / "manifest_v1.json"


def test_an_old_manifest_loads_into_the_row_dataclasses_and_is_rewritten_unchanged(tmp_path):
    shutil.copy(OLD, tmp_path / "manifest.json")
    m = load_manifest(tmp_path)
    assert all(isinstance(r, SubjectRow) for r in m.subjects) and all(isinstance(r, ShardRow) for r in m.shards)
    rows = {r.id: r for r in m.subjects}
    assert rows["100000"].group == "target" and set(rows["100000"].shards) == {"source", "target"}
    assert rows["100000"].motion and rows["100000"].patches == {"lr": 16, "hr": 16}
    assert rows["100009"].status == "failed" and "100009" in rows["100009"].error and not rows["100009"].shards
    assert [r.id for r in m.failed()] == ["100009"]
    assert [p.name for p in m.volume_paths("val")] == ["100001.h5"] and len(m.shard_paths("source")) == 2
    assert m.patch_count("target") == sum(r.patches["lr"] for r in m.subjects)
    assert DataConfig(**m.config).mode == "misaligned"  # the old config still validates
    write_manifest(m)
    assert (tmp_path / "manifest.json").read_text() == OLD.read_text()


@pytest.mark.parametrize("edit,message", [
    (lambda d: d["subjects"][1].update(colour="red"), r"subjects\[1\]: unknown keys \['colour'\]"),
    (lambda d: d["shards"][0].pop("sha256"), r"shards\[0\]: missing keys \['sha256'\]"),
    (lambda d: d["subjects"].append(["100100", "val"]), r"subjects\[4\]: expected an object"),
])
def test_a_row_off_the_schema_is_one_clear_error(tmp_path, edit, message):
    d = json.loads(OLD.read_text())
    edit(d)
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=message) as err:
        load_manifest(tmp_path)
    assert str(tmp_path / "manifest.json") in str(err.value)


def _failed(m, sid: str):
    """Subject `sid`'s row, failed: what a journal line of a rerun could say."""
    from dataclasses import replace

    return replace(m.subject(sid), status="failed", error="made up", shards={})


def test_a_journal_is_folded_into_the_manifest_and_a_torn_last_line_is_dropped(tmp_path):
    from preprocessing.manifest import Journal, journal_path

    shutil.copy(OLD, tmp_path / "manifest.json")
    m = load_manifest(tmp_path)
    j = Journal(tmp_path, m.config_hash)
    j.append(_failed(m, "100000"), [])
    j.close()
    with open(journal_path(tmp_path), "a") as f:  # a kill in the middle of the next line
        f.write('{"subject": {"id": "100001", "gro')
    folded = load_manifest(tmp_path)
    assert folded.subject("100000").status == "failed" and folded.subject("100000").error == "made up"
    assert not any(s.subject == "100000" for s in folded.shards)  # its shard rows went with it
    assert folded.subject("100001").status == m.subject("100001").status  # the torn line: not applied
    assert len(folded.subjects) == len(m.subjects) and len(folded.shards) < len(m.shards)
    # a journal of another config (a run of it killed before its plan was written) is ignored
    other = Journal(tmp_path, "another config")
    other.append(_failed(m, "100000"), [])
    other.close()
    assert load_manifest(tmp_path).subject("100000").status == m.subject("100000").status


@pytest.mark.parametrize("line,message", [
    ("not json", r"manifest.journal: line 2: not valid JSON"),
    ('{"subject": {"id": "x"}, "shards": []}', r"line 2: subject: missing keys \['group', 'input'\]"),
    ('{"subject": {"id": "x", "group": "val", "input": ""}, "shards": [{"path": "../x.h5", "group": "val", '
     '"subject": "x", "kind": "volume", "sha256": "", "patches": 0, "bytes": 1}]}', r"line 2: shards\[0\]: path"),
])
def test_a_bad_journal_line_is_one_clear_error(tmp_path, line, message):
    from preprocessing.manifest import Journal, journal_path

    shutil.copy(OLD, tmp_path / "manifest.json")
    Journal(tmp_path, load_manifest(tmp_path).config_hash).close()
    with open(journal_path(tmp_path), "a") as f:
        f.write(line + "\n" + '{"subject": {}, "shards": []}\n')
    with pytest.raises(ValueError, match=message):
        load_manifest(tmp_path)
