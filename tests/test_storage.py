"""The storage layer (core.storage) and the output store on it: local paths, file:// and s3://
(a local S3-compatible server) behave alike; shards stream, mix identities, carry Hugging Face
features and are left alone when nothing changed."""

from __future__ import annotations

import pickle
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from core.storage import atomic_local_path, has_scheme, resolve
from factory.schema import STAGED_SCHEMA
from factory.output.store import SHARDS_INDEX, OutputStore


def _staged(identity: str, kept: list[bool]) -> pa.Table:
    n = len(kept)
    source, _, pid = identity.partition("/")
    return pa.table({
        "image": [{"bytes": _jpeg(i), "path": f"{i}.jpg"} for i in range(n)], "source": [source] * n,
        "source_pid": [int(pid)] * n, "identity": [identity] * n, "prompt": ["p"] * n,
        "seed": list(range(n)), "score": [0.9 if k else 0.1 for k in kept], "index": list(range(n)), "kept": kept,
        "reason": ["" if k else "score 0.100 < threshold 0.5" for k in kept],
    }, schema=STAGED_SCHEMA)


def _jpeg(shade: int) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 16), (shade * 20 % 256, 0, 0)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture(params=["local", "file", "s3"])
def root(request, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "out")
    if request.param == "file":
        return f"file://{tmp_path}/out"
    return request.getfixturevalue("bucket") + "/out"


def test_locations_read_write_list_and_travel_as_uris(root: str) -> None:
    location = resolve(root)
    assert not location.exists()
    (location / "a" / "b.json").write_json({"x": 1})
    (location / "t.parquet").write_parquet(pa.table({"v": [1, 2]}))
    (location / ".hidden.tmp").write_bytes(b"-")
    assert (location / "a" / "b.json").read_json() == {"x": 1}
    assert [f.name for f in location.files(recursive=True)] == ["b.json", "t.parquet"]
    assert [f.name for f in location.files(".parquet")] == ["t.parquet"]
    copy = pickle.loads(pickle.dumps(location / "t.parquet"))
    assert copy.uri == (location / "t.parquet").uri and copy.read_parquet().column("v").to_pylist() == [1, 2]
    with pytest.raises(FileNotFoundError, match="nope"):
        (location / "nope").read_bytes()


def test_a_local_file_is_replaced_whole_or_not_at_all(tmp_path: Path) -> None:
    """Writers that want a file name (safetensors, pandas, YAML) go through one temporary name."""
    target = tmp_path / "deep" / "results.csv"
    with atomic_local_path(target) as tmp:
        tmp.write_text("old")
    with pytest.raises(RuntimeError), atomic_local_path(target) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("the writer died")
    assert target.read_text() == "old" and sorted(p.name for p in target.parent.iterdir()) == ["results.csv"]


def test_paths_and_uris_are_told_apart() -> None:
    assert has_scheme("s3://b/x") and has_scheme("file:///x") and not has_scheme("/x") and not has_scheme("x/y")
    assert resolve("rel/dir").uri == str(Path("rel/dir").resolve())
    assert resolve("memory://bucket/x").filesystem.type_name == "py::fsspec+memory"


def test_store_on_any_uri_resumes_mixes_identities_and_keeps_shards_when_unchanged(root: str) -> None:
    store = OutputStore(root)
    for pid in range(12):
        store.record_identity(f"demo/{pid}", {"generated": 6, "kept": 5 if pid != 4 else 0},
                              rows=_staged(f"demo/{pid}", [True] * 5 + [False] if pid != 4 else [False] * 6))
    store.record_failure("demo/99", "boom", 2)
    rerun = OutputStore(root)
    assert rerun.done == {f"demo/{pid}" for pid in range(12)}
    first = rerun.finalize(rows_per_shard=8, seed=3)
    assert (first.identities, first.images) == (11, 55) and first.rewritten
    frames = [resolve(uri).read_parquet().to_pandas() for uri in first.shards]
    assert len(frames) == 7 and all(len(f) == 8 for f in frames[:-1])
    # identities mixed across shards: no shard is one identity's block
    assert all(f["identity"].nunique() > 1 for f in frames)
    frame = pd.concat(frames)
    assert not frame.duplicated(["identity", "index"]).any()
    # pid dense in identity order (demo/4 kept nothing)
    expected = {f"demo/{pid}": label for label, pid in enumerate(p for p in range(12) if p != 4)}
    assert frame.groupby("identity")["pid"].first().to_dict() == expected
    # a rerun with nothing new leaves the shards alone; a new identity rewrites them
    again = OutputStore(root).finalize(rows_per_shard=8, seed=3)
    assert not again.rewritten and again.shards == first.shards
    rerun.record_identity("demo/12", {"generated": 1, "kept": 1}, rows=_staged("demo/12", [True]))
    third = rerun.finalize(rows_per_shard=8, seed=3)
    assert third.rewritten and third.images == 56
    listed = sorted(f.uri for f in (resolve(root) / "shards").files(".parquet"))
    assert listed == sorted(third.shards), "the old generation's files are gone"
    assert (resolve(root) / "shards" / SHARDS_INDEX).read_json()["images"] == 56


def test_shards_load_in_huggingface_datasets_with_image_and_class_label(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    store = OutputStore(tmp_path)
    for pid in (3, 10):
        store.record_identity(f"demo/{pid}", {"generated": 2, "kept": 2}, rows=_staged(f"demo/{pid}", [True, True]))
    result = store.finalize(rows_per_shard=100)
    loaded = datasets.load_dataset("parquet", data_files=result.shards, split="train")
    assert isinstance(loaded.features["image"], datasets.Image)
    assert isinstance(loaded.features["pid"], datasets.ClassLabel)
    assert loaded.features["pid"].names == ["demo/3", "demo/10"]
    assert loaded[0]["image"].size == (8, 16)
    # Ray Data / pandas read the same files as before: image is a {bytes, path} struct
    assert set(pd.read_parquet(result.shards[0])["image"].iloc[0]) == {"bytes", "path"}


def test_a_source_dataset_on_an_object_store_is_fetched_once(bucket: str, tmp_path: Path) -> None:
    from core.datasets.config import SourceConfig, SyntheticSpec
    from core.datasets.registry import fetch_source, load_source

    local = load_source(SourceConfig(kind="synthetic", root=tmp_path / "src", generate=SyntheticSpec(ids=3, cameras=2)))
    remote = resolve(f"{bucket}/market")
    for path in (tmp_path / "src").rglob("*.jpg"):
        (remote / path.relative_to(tmp_path / "src").as_posix()).write_bytes(path.read_bytes())
    config = SourceConfig(kind="market1501", root=remote.uri, name="synthetic")
    fetched = fetch_source(config, cache=tmp_path / "cache")
    assert fetched.root.startswith(str(tmp_path / "cache"))
    stamps = {p: p.stat().st_mtime_ns for p in Path(fetched.root).rglob("*.jpg")}
    assert len(stamps) == len(list((tmp_path / "src").rglob("*.jpg")))
    fetch_source(config, cache=tmp_path / "cache")  # a second load: nothing fetched again
    assert {p: p.stat().st_mtime_ns for p in Path(fetched.root).rglob("*.jpg")} == stamps
    dataset = load_source(fetched)
    assert sorted((r.pid, r.camid) for r in dataset.train) == sorted((r.pid, r.camid) for r in local.train)
    with pytest.raises(ValueError, match="synthetic' generates into a local root"):
        SourceConfig(kind="synthetic", root="s3://bucket/x")


def test_a_model_folder_on_an_object_store_is_mirrored_once_per_machine(
    bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model URI (`generation.base_model: s3://...`): the check phase and the loaders see a local
    copy under this node's cache; a second use lists the folder and fetches nothing again."""
    from factory.models.locate import ModelNotAvailableError, check_model_available, local_model, read_model_json

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = resolve(f"{bucket}/models/captioner")
    (model / "config.json").write_json({"model_type": "blip-2"})
    (model / "tokenizer" / "vocab.json").write_json({"a": 0})
    check_model_available(model.uri, "caption.model")
    local = Path(local_model(model.uri))
    assert local.is_relative_to(tmp_path / "cache" / "reid-factory" / "models")
    assert read_model_json(model.uri, "tokenizer/vocab.json")[0] == {"a": 0}
    stamp = (local / "config.json").stat().st_mtime_ns
    assert Path(local_model(model.uri)) == local and (local / "config.json").stat().st_mtime_ns == stamp
    with pytest.raises(ModelNotAvailableError, match="caption.model"):
        check_model_available(f"{bucket}/models/missing", "caption.model")
