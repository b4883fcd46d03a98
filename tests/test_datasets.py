"""Source adapters on tiny trees written in each dataset's real naming format.

Adapters only list files and parse names, so empty files stand in for images.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterable
from pathlib import Path

import pytest

from core.datasets import (
    DatasetError,
    ImageRecord,
    ReidDataset,
    SourceConfig,
    load_airport,
    load_csv,
    load_cuhk03,
    load_folder,
    load_market1501,
    load_msmt17,
    load_source,
)
from core.datasets.generic import parse_market_name


def touch(root: Path, names: Iterable[str]) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def ids(rows: list[ImageRecord]) -> set[int]:
    return {r.pid for r in rows}


def cams(rows: list[ImageRecord]) -> set[int]:
    return {r.camid for r in rows}


# ---------------------------------------------------------------------------------------------
# Market-1501


MARKET_FILES = [
    "bounding_box_train/0002_c1s1_000451_03.jpg",
    "bounding_box_train/0002_c2s1_000551_01.jpg",
    "bounding_box_train/0007_c3s3_076470_03.jpg",
    "bounding_box_train/0007_c6s1_001234_02.jpg",
    "bounding_box_train/0000_c1s1_000001_00.jpg",  # distractor: never a training identity
    "bounding_box_train/-1_c1s1_000401_03.jpg",  # junk
    "bounding_box_train/Thumbs.db",  # not an image
    "query/0003_c1s1_000001_00.jpg",
    "query/0003_c4s1_000002_00.jpg",
    "bounding_box_test/0003_c2s1_000003_00.jpg",
    "bounding_box_test/0003_c5s2_000004_01.jpg",
    "bounding_box_test/0000_c1s1_000005_00.jpg",
    "bounding_box_test/0000_c3s1_000006_00.jpg",
    "bounding_box_test/-1_c2s1_000007_00.jpg",
]


@pytest.fixture
def market_root(tmp_path: Path) -> Path:
    root = tmp_path / "Market-1501"
    touch(root, MARKET_FILES)
    return root


def test_market_name_parsing() -> None:
    assert parse_market_name(Path("0002_c1s1_000451_03.jpg")) == (2, 0, 1, 451)
    assert parse_market_name(Path("-1_c3s2_000001_00.jpg")) == (-1, 2, 2, 1)
    assert parse_market_name(Path("0001_c2_7.png")) == (1, 1, 0, 7)  # CUHK03-NP
    assert parse_market_name(Path("0001_c2.jpg")) == (1, 1, 0, -1)


def test_market_counts_conventions(market_root: Path) -> None:
    data = load_market1501(market_root)
    assert (len(data.train), len(data.query), len(data.gallery)) == (4, 2, 4)
    assert data.train_identities == [2, 7]
    assert cams(data.train) == {0, 1, 2, 5}
    assert ids(data.query) == {3} and cams(data.query) == {0, 3}
    assert all(r.pid != -1 for r in data.train + data.query + data.gallery)
    assert 0 not in ids(data.train)
    distractors = [r for r in data.gallery if r.distractor]
    assert len(distractors) == 2 and all(r.pid == 0 for r in distractors)
    first = data.train[0]
    assert (first.pid, first.camid, first.sequence, first.frame) == (2, 0, 1, 451)
    assert first.split == "train"
    assert Path(first.path).is_absolute() and Path(first.path).is_relative_to(market_root.resolve())
    assert {r.source for r in data.train} == {"market1501"}


def test_market_missing_folder(market_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="nowhere"):
        load_market1501(tmp_path / "nowhere")
    (market_root / "query").rename(market_root / "queries")
    with pytest.raises(DatasetError, match=r"query"):
        load_market1501(market_root)


def test_market_malformed_filename_names_path(market_root: Path) -> None:
    touch(market_root, ["bounding_box_train/person_12.jpg"])
    with pytest.raises(DatasetError, match="person_12.jpg"):
        load_market1501(market_root)


def test_market_camera_zero_rejected(market_root: Path) -> None:
    touch(market_root, ["query/0003_c0s1_000001_00.jpg"])
    with pytest.raises(DatasetError, match="c0"):
        load_market1501(market_root)


def test_market_empty_dataset(tmp_path: Path) -> None:
    touch(tmp_path, [
        "bounding_box_train/0000_c1s1_000001_00.jpg",
        "bounding_box_train/-1_c1s1_000002_00.jpg",
    ])
    (tmp_path / "query").mkdir()
    (tmp_path / "bounding_box_test").mkdir()
    with pytest.raises(DatasetError, match="no training identities"):
        load_market1501(tmp_path)


def test_market_symlink_escaping_root(market_root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "secret.jpg"
    outside.touch()
    (market_root / "bounding_box_train" / "0009_c1s1_000001_00.jpg").symlink_to(outside)
    with pytest.raises(DatasetError, match="escapes"):
        load_market1501(market_root)


def test_market_reports_every_problem_at_once(market_root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "secret.jpg"
    outside.touch()
    escaping = [
        "bounding_box_train/0009_c1s1_000001_00.jpg",
        "query/0010_c2s1_000002_00.jpg",
        "bounding_box_test/0011_c3s1_000003_00.jpg",
    ]
    for name in escaping:
        (market_root / name).symlink_to(outside)
    malformed = ["bounding_box_train/person_12.jpg", "bounding_box_test/img_0042.jpg"]
    touch(market_root, malformed)
    with pytest.raises(DatasetError) as caught:
        load_market1501(market_root)
    message = str(caught.value)
    first, *problems = message.splitlines()
    assert "market1501" in first and "5 problems" in first and "nothing was read" in first
    assert len(problems) == 5
    for name in escaping + malformed:
        assert sum(Path(name).name in line for line in problems) == 1, name
    assert sum("escapes" in line for line in problems) == 3
    assert sum("does not match Market naming" in line for line in problems) == 2


def test_market_problem_list_is_capped(market_root: Path) -> None:
    touch(market_root, [f"bounding_box_train/bad_{i:02d}.jpg" for i in range(30)])
    with pytest.raises(DatasetError) as caught:
        load_market1501(market_root)
    first, *rest = str(caught.value).splitlines()
    assert "30 problems" in first
    assert len(rest) == 21 and rest[-1].strip() == "... and 10 more"
    assert all("does not match Market naming" in line for line in rest[:20])


def test_market_split_folder_symlinked_outside_root(market_root: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    touch(elsewhere, ["0005_c1s1_000001_00.jpg"])
    shutil.rmtree(market_root / "query")
    (market_root / "query").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(DatasetError, match="escapes"):
        load_market1501(market_root)


# ---------------------------------------------------------------------------------------------
# CUHK03-NP


@pytest.fixture
def cuhk03_root(tmp_path: Path) -> Path:
    root = tmp_path / "cuhk03-np"
    touch(root, [
        "labeled/bounding_box_train/0001_c1_1.png",
        "labeled/bounding_box_train/0001_c2_6.png",
        "labeled/bounding_box_train/0002_c1_2.png",
        "labeled/query/0003_c1_1.png",
        "labeled/bounding_box_test/0003_c2_7.png",
        "labeled/bounding_box_test/0004_c1_3.png",
        "detected/bounding_box_train/0001_c1_1.png",
        "detected/bounding_box_train/0001_c2_2.png",
        "detected/query/0003_c2_8.png",
        "detected/bounding_box_test/0003_c1_4.png",
    ])
    return root


def test_cuhk03_labeled_default(cuhk03_root: Path) -> None:
    data = load_cuhk03(cuhk03_root)
    assert (len(data.train), len(data.query), len(data.gallery)) == (3, 1, 2)
    assert data.train_identities == [1, 2]
    assert cams(data.train) == {0, 1}
    assert [(r.pid, r.camid, r.frame) for r in data.train] == [(1, 0, 1), (1, 1, 6), (2, 0, 2)]
    assert all("/labeled/" in r.path for r in data.train)


def test_cuhk03_detected(cuhk03_root: Path) -> None:
    data = load_cuhk03(cuhk03_root, variant="detected")
    assert (len(data.train), len(data.query), len(data.gallery)) == (2, 1, 1)
    assert data.train_identities == [1]
    assert data.query[0].camid == 1 and data.query[0].frame == 8
    assert all("/detected/" in r.path for r in data.train + data.query + data.gallery)


def test_cuhk03_missing_variant_folder(cuhk03_root: Path) -> None:
    import shutil

    shutil.rmtree(cuhk03_root / "detected")
    with pytest.raises(DatasetError, match="detected"):
        load_cuhk03(cuhk03_root, variant="detected")


# ---------------------------------------------------------------------------------------------
# MSMT17


MSMT_LISTS = {
    "list_train.txt": (
        "0000/0000_000_01_0303morning_0015_0.jpg 0\n"
        "0000/0000_001_05_0303noon_0020_1.jpg 0\n"
        "0001/0001_000_12_0303afternoon_0100_0.jpg 1\n"
    ),
    "list_val.txt": "0001/0001_001_03_0303morning_0200_0.jpg 1\n",
    "list_query.txt": "0000/0000_000_02_0113morning_0001_0.jpg 0\n",
    "list_gallery.txt": (
        "0000/0000_001_15_0113noon_0002_0.jpg 0\n"
        "0002/0002_000_07_0113noon_0003_0.jpg 2\n"
    ),
}


def make_msmt(root: Path, train_dir: str, test_dir: str) -> Path:
    for name, text in MSMT_LISTS.items():
        write(root / name, text)
        folder = train_dir if name in ("list_train.txt", "list_val.txt") else test_dir
        touch(root / folder, [line.split()[0] for line in text.splitlines()])
    return root


@pytest.mark.parametrize(
    ("variant", "train_dir", "test_dir"),
    [("v1", "train", "test"), ("v2", "mask_train_v2", "mask_test_v2")],
)
def test_msmt17_layouts(tmp_path: Path, variant: str, train_dir: str, test_dir: str) -> None:
    root = make_msmt(tmp_path / "MSMT17", train_dir, test_dir)
    for chosen in (variant, None):  # explicit, and detected from the folders
        data = load_msmt17(root, variant=chosen)
        assert (len(data.train), len(data.query), len(data.gallery)) == (4, 1, 2)
        assert data.train_identities == [0, 1]  # pid 0 is a real MSMT17 identity
        assert not any(r.distractor for r in data.train + data.query + data.gallery)
        assert cams(data.train) == {0, 4, 11, 2}
        assert cams(data.gallery) == {14, 6}
        first = data.train[0]
        assert (first.pid, first.camid, first.frame) == (0, 0, 15)
        expected = root / train_dir / "0000/0000_000_01_0303morning_0015_0.jpg"
        assert first.path == str(expected.resolve())
        assert data.query[0].path.startswith(str((root / test_dir).resolve()))


def test_msmt17_wrong_variant_and_parent_root(tmp_path: Path) -> None:
    root = make_msmt(tmp_path / "MSMT17_V1", "train", "test")
    with pytest.raises(DatasetError, match="mask_train_v2"):
        load_msmt17(root, variant="v2")
    assert len(load_msmt17(tmp_path).train) == 4  # root may be the folder holding MSMT17_V1/


def test_msmt17_list_paths_with_folder_prefix(tmp_path: Path) -> None:
    root = make_msmt(tmp_path, "train", "test")
    write(root / "list_val.txt", "train/0001/0001_001_03_0303morning_0200_0.jpg 1\n")
    data = load_msmt17(root)
    expected = root / "train/0001/0001_001_03_0303morning_0200_0.jpg"
    assert data.train[-1].path == str(expected.resolve())


def test_msmt17_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    root = make_msmt(tmp_path, "train", "test")
    lines = "0000/0000_000_02_0113morning_0001_0.jpg 0\n\n0000/x.jpg 0 extra\n"
    write(root / "list_query.txt", lines)
    with pytest.raises(DatasetError, match=r"list_query\.txt:3"):
        load_msmt17(root)
    write(root / "list_query.txt", "0000/0000_000_xx_0113morning_0001_0.jpg 0\n")
    with pytest.raises(DatasetError, match=r"list_query\.txt:1: camera field"):
        load_msmt17(root)


def test_msmt17_missing_list_file(tmp_path: Path) -> None:
    root = make_msmt(tmp_path, "train", "test")
    (root / "list_gallery.txt").unlink()
    with pytest.raises(DatasetError, match="list_gallery.txt"):
        load_msmt17(root)


def test_msmt17_escaping_path(tmp_path: Path) -> None:
    root = make_msmt(tmp_path / "d", "train", "test")
    write(root / "list_train.txt", "../../../etc/0000_000_01_0303morning_0015_0.jpg 0\n")
    with pytest.raises(DatasetError, match=r"list_train\.txt:1: .*escapes"):
        load_msmt17(root)


def test_msmt17_reports_every_bad_line(tmp_path: Path) -> None:
    root = make_msmt(tmp_path / "d", "train", "test")
    write(root / "list_train.txt", (
        "0000/0000_000_01_0303morning_0015_0.jpg 0\n"
        "../../../etc/0000_000_01_0303morning_0015_0.jpg 0\n"
    ))
    write(root / "list_gallery.txt", "0000/0000_001_15_0113noon_0002_0.jpg zero\n")
    with pytest.raises(DatasetError) as caught:
        load_msmt17(root)
    first, *problems = str(caught.value).splitlines()
    assert "2 problems" in first
    assert len(problems) == 2
    assert "list_train.txt:2: " in problems[0] and "escapes" in problems[0]
    assert "list_gallery.txt:1: pid must be an integer" in problems[1]


# ---------------------------------------------------------------------------------------------
# Airport


AIRPORT_LIST = """\
# RELPATH PID CAMID [SPLIT] [FRAME]
images/cam01/00123_04.jpg 17 0 train 4
images/cam03/00124_01.jpg 17 2
images/cam02/00125_01.jpg 18 1 train

images/cam04/00126_01.jpg -1 3 train
images/cam02/00789_02.jpg 523 1 query
images/cam05/01011_00.jpg 523 4 gallery
images/cam06/01012_00.jpg 0 5 gallery
images/cam06/01013_00.jpg 0 5 train
"""


def test_airport_list(tmp_path: Path) -> None:
    write(tmp_path / "list.txt", AIRPORT_LIST)
    data = load_airport(tmp_path)
    assert (len(data.train), len(data.query), len(data.gallery)) == (3, 1, 2)
    assert data.train_identities == [17, 18]
    assert cams(data.train) == {0, 1, 2}
    assert data.train[0].frame == 4 and data.train[1].frame == -1
    assert [r.distractor for r in data.gallery] == [False, True]


def test_airport_custom_list_file_and_errors(tmp_path: Path) -> None:
    write(tmp_path / "splits/alert.txt", "a.jpg 1 0\nb.jpg 1 x\n")
    with pytest.raises(DatasetError, match=r"alert\.txt:2: camid must be an integer"):
        load_airport(tmp_path, list_file=Path("splits/alert.txt"))
    write(tmp_path / "splits/alert.txt", "a.jpg 1 0\nb.jpg 1 0 validation\n")
    with pytest.raises(DatasetError, match=r"alert\.txt:2: split must be"):
        load_airport(tmp_path, list_file=Path("splits/alert.txt"))
    write(tmp_path / "splits/alert.txt", "a.jpg 1\n")
    with pytest.raises(DatasetError, match=r"alert\.txt:1: expected"):
        load_airport(tmp_path, list_file=Path("splits/alert.txt"))
    with pytest.raises(DatasetError, match="list file not found"):
        load_airport(tmp_path)


def test_airport_path_escaping_root(tmp_path: Path) -> None:
    write(tmp_path / "list.txt", "a.jpg 1 0\n../x.jpg 2 0\n")
    with pytest.raises(DatasetError, match=r"list\.txt:2: .*escapes"):
        load_airport(tmp_path)


def test_airport_empty(tmp_path: Path) -> None:
    write(tmp_path / "list.txt", "# only junk and distractors\na.jpg -1 0\nb.jpg 0 1 gallery\n")
    with pytest.raises(DatasetError, match="no training identities"):
        load_airport(tmp_path)


# ---------------------------------------------------------------------------------------------
# Generic folder and CSV


def test_folder_flat_layout(tmp_path: Path) -> None:
    touch(tmp_path, [
        "0001/a.jpg", "0001/b.png", "0002/0002_c3s1_000010_00.jpg", "0002/notes.txt", "-1/c.jpg",
    ])
    data = load_folder(tmp_path)
    assert (len(data.train), len(data.query), len(data.gallery)) == (3, 0, 0)
    assert data.train_identities == [1, 2]
    by_name = {Path(r.path).name: r for r in data.train}
    assert by_name["a.jpg"].camid == 0 and by_name["a.jpg"].frame == -1
    market_named = by_name["0002_c3s1_000010_00.jpg"]
    assert (market_named.camid, market_named.frame) == (2, 10)


def test_folder_split_layout(tmp_path: Path) -> None:
    touch(tmp_path, [
        "train/1/x_c1.jpg", "train/1/y_c2.jpg", "train/2/z.jpg", "train/0/d.jpg",
        "query/5/q_c1.jpg", "gallery/5/g_c2.jpg", "gallery/0/d.jpg",
    ])
    data = load_folder(tmp_path)
    assert (len(data.train), len(data.query), len(data.gallery)) == (3, 1, 2)
    assert data.train_identities == [1, 2]
    assert sum(r.distractor for r in data.gallery) == 1
    assert [r.camid for r in data.train] == [0, 1, 0]
    assert (data.query[0].camid, data.gallery[1].camid) == (0, 1)


def test_folder_bad_identity_folder(tmp_path: Path) -> None:
    touch(tmp_path, ["alice/a.jpg"])
    with pytest.raises(DatasetError, match="alice"):
        load_folder(tmp_path)


def test_csv_list(tmp_path: Path) -> None:
    write(tmp_path / "list.csv", (
        "path,pid,camid,split,frame\n"
        "imgs/a.jpg,3,0,train,10\n"
        "imgs/b.jpg,3,1,,11\n"
        "imgs/c.jpg,4,2,train,\n"
        "imgs/d.jpg,-1,2,train,\n"
        "imgs/e.jpg,9,0,query,\n"
        "imgs/f.jpg,9,1,gallery,\n"
        "imgs/g.jpg,0,1,gallery,\n"
    ))
    data = load_csv(tmp_path)
    assert (len(data.train), len(data.query), len(data.gallery)) == (3, 1, 2)
    assert data.train_identities == [3, 4]
    assert [r.frame for r in data.train] == [10, 11, -1]
    assert cams(data.train) == {0, 1, 2}


def test_csv_errors(tmp_path: Path) -> None:
    write(tmp_path / "l.csv", "path,pid\na.jpg,1\n")
    with pytest.raises(DatasetError, match=r"l\.csv:1: header"):
        load_csv(tmp_path, list_file=Path("l.csv"))
    write(tmp_path / "l.csv", "path,pid,camid\na.jpg,1,0\nb.jpg,one,0\n")
    with pytest.raises(DatasetError, match=r"l\.csv:3: pid must be an integer"):
        load_csv(tmp_path, list_file=Path("l.csv"))
    write(tmp_path / "l.csv", "path,pid,camid\na.jpg,1\n")
    with pytest.raises(DatasetError, match=r"l\.csv:2: expected 3 columns"):
        load_csv(tmp_path, list_file=Path("l.csv"))
    write(tmp_path / "l.csv", "path,pid,camid\n../x.jpg,1,0\n")
    with pytest.raises(DatasetError, match=r"l\.csv:2: .*escapes"):
        load_csv(tmp_path, list_file=Path("l.csv"))


def test_csv_reports_every_bad_line(tmp_path: Path) -> None:
    write(tmp_path / "l.csv", "path,pid,camid\n../x.jpg,1,0\na.jpg,1,0\nb.jpg,1\nc.jpg,1,-2\n")
    with pytest.raises(DatasetError) as caught:
        load_csv(tmp_path, list_file=Path("l.csv"))
    message = str(caught.value)
    assert "3 problems" in message.splitlines()[0]
    for located_reason in (r"l\.csv:2: .*escapes", r"l\.csv:4: expected 3 columns", r"l\.csv:5: "):
        assert re.search(located_reason, message), located_reason
    assert "l.csv:3" not in message


def test_folder_reports_every_bad_identity_folder(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    touch(outside, ["o.jpg"])
    root = tmp_path / "data"
    touch(root, ["alice/a.jpg", "bob/b.jpg", "7/c.jpg"])
    (root / "8").symlink_to(outside, target_is_directory=True)
    with pytest.raises(DatasetError) as caught:
        load_folder(root)
    first, *problems = str(caught.value).splitlines()
    assert "3 problems" in first and len(problems) == 3
    assert sum("alice" in line or "bob" in line for line in problems) == 2
    assert any("'8'" in line and "escapes" in line for line in problems)


# ---------------------------------------------------------------------------------------------
# Registry


def test_load_source_dispatch_and_source_name(
    market_root: Path, cuhk03_root: Path, tmp_path: Path
) -> None:
    msmt = make_msmt(tmp_path / "msmt", "mask_train_v2", "mask_test_v2")
    write(tmp_path / "airport/list.txt", AIRPORT_LIST)
    touch(tmp_path / "folder", ["7/a.jpg"])
    write(tmp_path / "csv/list.csv", "path,pid,camid\na.jpg,1,0\n")
    cases: list[tuple[SourceConfig, int]] = [
        (SourceConfig(kind="market1501", root=market_root, name="m"), 4),
        (SourceConfig(kind="cuhk03", root=cuhk03_root, variant="detected"), 2),
        (SourceConfig(kind="msmt17", root=msmt), 4),
        (SourceConfig(kind="airport", root=tmp_path / "airport", name="alert"), 3),
        (SourceConfig(kind="folder", root=tmp_path / "folder"), 1),
        (SourceConfig(kind="csv", root=tmp_path / "csv"), 1),
    ]
    for config, train_images in cases:
        data = load_source(config)
        assert isinstance(data, ReidDataset)
        assert len(data.train) == train_images, config.kind
        assert data.name == config.source_name
        assert {r.source for r in data.train + data.query + data.gallery} == {config.source_name}


def test_load_source_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="missing"):
        load_source(SourceConfig(kind="airport", root=tmp_path / "missing"))
