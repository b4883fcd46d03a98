"""Identity planning, image quarantine and the resumable output store."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from core.datasets.base import ImageRecord, ReidDataset
from factory.schema import SHARD_SCHEMA, STAGED_SCHEMA
from factory.sequences import plan_identities, read_sequences, select_sequence, stable_seed
from core.settings.stages import SequenceConfig
from factory.output.store import OutputStore


def _jpeg(path: Path, colour=(120, 20, 20)) -> Path:
    Image.new("RGB", (16, 32), colour).save(path, format="JPEG")
    return path


def _record(path: Path, pid: int, cam: int, frame: int, distractor: bool = False) -> ImageRecord:
    return ImageRecord(str(path), "demo", pid, cam, "train", frame=frame, distractor=distractor)


def test_sequence_is_longest_camera_run_in_frame_order(tmp_path: Path) -> None:
    records = [
        _record(tmp_path / "a", 1, 0, 5), _record(tmp_path / "b", 1, 1, 9), _record(tmp_path / "c", 1, 1, 3),
        _record(tmp_path / "d", 1, 1, 7), _record(tmp_path / "e", 1, 0, 1),
    ]
    sequence = select_sequence(records, SequenceConfig(max_images=2))
    assert sequence.camid == 1
    assert [r.frame for r in sequence.records] == [3, 7]


def test_plan_skips_distractors_and_caps(tmp_path: Path) -> None:
    dataset = ReidDataset("demo", tmp_path, train=[
        _record(tmp_path / "a", 2, 0, 0), _record(tmp_path / "b", 1, 0, 0), _record(tmp_path / "c", 0, 0, 0, distractor=True),
    ])
    plan = plan_identities([dataset], SequenceConfig())
    assert [s.key for s in plan] == ["demo/1", "demo/2"]
    assert [s.key for s in plan_identities([dataset], SequenceConfig(max_identities=1))] == ["demo/1"]


def test_corrupt_and_truncated_images_are_quarantined(tmp_path: Path) -> None:
    good = [_jpeg(tmp_path / f"g{i}.jpg") for i in range(3)]
    truncated = tmp_path / "t.jpg"
    truncated.write_bytes(_jpeg(tmp_path / "full.jpg").read_bytes()[:60])
    garbage = tmp_path / "x.jpg"
    garbage.write_bytes(b"not an image at all")
    missing = tmp_path / "missing.jpg"
    dataset = ReidDataset("demo", tmp_path, train=[
        _record(good[0], 1, 0, 0), _record(truncated, 1, 0, 1), _record(good[1], 1, 0, 2),
        _record(garbage, 2, 0, 0), _record(missing, 2, 0, 1),
        _record(good[2], 3, 0, 0),
    ])
    plan = plan_identities([dataset], SequenceConfig())
    table, report = read_sequences(plan, SequenceConfig(min_images=1), base_seed=0)
    assert table.column("identity").to_pylist() == ["demo/1", "demo/3"]
    assert table.column("image_paths").to_pylist()[0] == [str(good[0]), str(good[1])]
    assert {q["path"] for q in report.quarantined} == {str(truncated), str(garbage), str(missing)}
    assert report.skipped_identities == [{"identity": "demo/2", "reason": "0 readable images < min_images 1"}]
    assert table.column("seed").to_pylist()[0] == stable_seed(0, "demo/1")


def _staged(identity: str, kept: list[bool]) -> pa.Table:
    n = len(kept)
    source, _, pid = identity.partition("/")
    return pa.table({
        "image": [{"bytes": bytes([i]), "path": f"{i}.jpg"} for i in range(n)], "source": [source] * n,
        "source_pid": [int(pid)] * n, "identity": [identity] * n, "prompt": ["p"] * n,
        "seed": list(range(n)), "score": [0.9 if k else 0.1 for k in kept], "index": list(range(n)), "kept": kept,
        "reason": ["" if k else "score 0.100 < threshold 0.5" for k in kept],
    }, schema=STAGED_SCHEMA)


def test_store_resumes_and_writes_dense_pids(tmp_path: Path) -> None:
    store = OutputStore(tmp_path)
    store.record_identity("demo/10", {"generated": 3, "kept": 2}, rows=_staged("demo/10", [True, False, True]))
    store.record_identity("demo/2", {"generated": 2, "kept": 0}, rows=_staged("demo/2", [False, False]))
    store.record_failure("demo/5", "boom", 2)
    # A new store on the same directory (a rerun) sees the finished identities.
    rerun = OutputStore(tmp_path)
    assert rerun.done == {"demo/10", "demo/2"}
    assert rerun.manifest["failed"]["demo/5"]["error"] == "boom"
    rerun.record_identity("demo/3", {"generated": 1, "kept": 1}, rows=_staged("demo/3", [True]))
    result = rerun.finalize(rows_per_shard=2)
    assert (result.identities, result.images) == (2, 3)
    frame = pd.read_parquet(tmp_path / "shards")
    assert pq.read_schema(result.shards[0]).equals(SHARD_SCHEMA)
    # identity order is (source, numeric pid): demo/3 before demo/10; demo/2 kept nothing.
    assert frame.groupby("identity")["pid"].first().to_dict() == {"demo/3": 0, "demo/10": 1}
    assert sorted(frame["pid"].unique()) == [0, 1]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir() if p.is_dir() and "shards" in p.name)


def test_manifest_entry_without_staging_file_is_not_done(tmp_path: Path) -> None:
    store = OutputStore(tmp_path)
    store.record_identity("demo/1", {"generated": 1, "kept": 1}, rows=_staged("demo/1", [True]))
    (tmp_path / store.manifest["identities"]["demo/1"]["file"]).unlink()
    assert OutputStore(tmp_path).done == set()


def test_corrupt_manifest_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(RuntimeError, match="manifest.json"):
        OutputStore(tmp_path)
