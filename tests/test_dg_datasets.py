"""Adapters of the DG datasets (PersonX, CUHK02, CUHK-SYSU, PRID, GRID, VIPeR, i-LIDS) on tiny
trees in each release's layout, and the random query/gallery test splits of `test_splits`.

The small fixture trees hold real (tiny) images written with PIL. The full-size trees that check
the protocol's standard numbers (632 VIPeR pairs, ...) hold empty files: adapters only list files
and parse names, and 4,000 empty files are written in a fraction of a second.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from core.datasets import (
    DatasetError,
    ImageRecord,
    ReidDataset,
    SourceConfig,
    TestProtocol,
    load_cuhk02,
    load_cuhk_sysu,
    load_grid,
    load_ilids,
    load_market1501,
    load_personx,
    load_prid,
    load_source,
    load_viper,
    protocol_for,
)
from core.datasets import test_splits as splits


def save_images(root: Path, names: Iterable[str]) -> Path:
    """A tiny RGB image at each relative path, in the format its suffix names."""
    for index, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 8), (index % 256, 40, 90)).save(path)
    return root


def touch(root: Path, names: Iterable[str]) -> Path:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    return root


def ids(rows: list[ImageRecord]) -> set[int]:
    return {r.pid for r in rows}


def cams(rows: list[ImageRecord]) -> set[int]:
    return {r.camid for r in rows}


def names(rows: list[ImageRecord]) -> list[str]:
    return sorted(Path(r.path).name for r in rows)


# ---------------------------------------------------------------------------------------------
# Tiny trees in each release's layout


@dataclass(frozen=True)
class Tree:
    """A tiny tree of one dataset kind, and how to damage it."""

    kind: str
    files: tuple[str, ...]
    required_folder: str  # removing it must be refused, naming it
    malformed: str  # an image whose name breaks the naming rule
    link: str  # a well-named image that will be a symlink pointing outside the root

    def build(self, root: Path) -> Path:
        return save_images(root, self.files)

    def folders(self) -> set[str]:
        return {str(Path(name).parent) for name in self.files}


PERSONX = Tree(
    kind="personx",
    files=(
        "PersonX_v1/5/bounding_box_train/0001_c1s1_000010_00.jpg",
        "PersonX_v1/5/bounding_box_train/0001_c3s1_000020_00.jpg",
        "PersonX_v1/5/bounding_box_train/0002_c2s1_000030_00.jpg",
        "PersonX_v1/5/bounding_box_train/0000_c2s1_000031_00.jpg",  # background: no identity
        "PersonX_v1/5/query/0100_c1s1_000040_00.jpg",
        "PersonX_v1/5/bounding_box_test/0100_c4s1_000050_00.jpg",
        "PersonX_v1/5/bounding_box_test/0101_c6s1_000060_00.jpg",
        "PersonX_v1/6/bounding_box_train/0001_c2s1_000070_00.jpg",
        "PersonX_v1/6/bounding_box_train/0003_c5s1_000080_00.jpg",
        "PersonX_v1/6/query/0100_c2s1_000090_00.jpg",
        "PersonX_v1/6/bounding_box_test/0100_c1s1_000100_00.jpg",
    ),
    required_folder="PersonX_v1/6/query",
    malformed="PersonX_v1/5/bounding_box_train/person_0001.jpg",
    link="PersonX_v1/6/bounding_box_train/0009_c1s1_000001_00.jpg",
)
CUHK02 = Tree(
    kind="cuhk02",
    files=tuple(
        f"Dataset/P{pair}/cam{cam}/{number:03d}_{cam}.png"
        for pair in range(1, 6) for number in (1, 2) for cam in (1, 2)
    ) + ("Dataset/P1/cam1/002_3.png",),
    required_folder="Dataset/P4/cam2",
    malformed="Dataset/P2/cam1/img1.png",
    link="Dataset/P3/cam1/007_1.png",
)
CUHK_SYSU = Tree(
    kind="cuhk_sysu",
    files=(
        "cropped_images/p11422_s16929_1.jpg",
        "cropped_images/p11422_s16930_1.jpg",
        "cropped_images/p00017_s00003_2.jpg",
        "cropped_images/p00018_s00003.jpg",
    ),
    required_folder="cropped_images",
    malformed="cropped_images/s16929_p11422.jpg",
    link="cropped_images/p00019_s00004_1.jpg",
)
PRID = Tree(
    kind="prid",
    files=tuple(f"prid_2011/single_shot/cam_a/person_{n:04d}.png" for n in (1, 2, 3, 4, 5))
    + tuple(f"prid_2011/single_shot/cam_b/person_{n:04d}.png" for n in (1, 2, 3, 6, 7, 8)),
    required_folder="prid_2011/single_shot/cam_b",
    malformed="prid_2011/single_shot/cam_a/person_A001.png",
    link="prid_2011/single_shot/cam_b/person_0009.png",
)
GRID = Tree(
    kind="grid",
    files=(
        "underground_reid/probe/0001_1_25004_107_32_130_316.jpeg",
        "underground_reid/probe/0002_3_25100_229_94_99_249.jpeg",
        "underground_reid/probe/0003_4_25200_10_20_30_40.jpeg",
        "underground_reid/gallery/0001_5_26004_100_30_120_300.jpeg",
        "underground_reid/gallery/0002_6_26100_220_90_95_240.jpeg",
        "underground_reid/gallery/0003_8_26200_11_21_31_41.jpeg",
        "underground_reid/gallery/0000_2_27001_1_2_3_4.jpeg",
        "underground_reid/gallery/0000_7_27002_5_6_7_8.jpeg",
    ),
    required_folder="underground_reid/gallery",
    malformed="underground_reid/probe/0004-2-25300.jpeg",
    link="underground_reid/probe/0005_2_25400_1_1_1_1.jpeg",
)
VIPER = Tree(
    kind="viper",
    files=tuple(f"VIPeR/cam_a/{n:03d}_45.bmp" for n in (0, 1, 2, 5))
    + tuple(f"VIPeR/cam_b/{n:03d}_90.bmp" for n in (0, 1, 2, 5)),
    required_folder="VIPeR/cam_b",
    malformed="VIPeR/cam_a/a_45.bmp",
    link="VIPeR/cam_a/007_0.bmp",
)
ILIDS = Tree(
    kind="ilids",
    files=("i-LIDS_Pedestrian/Persons/0001001.jpg", "i-LIDS_Pedestrian/Persons/0001002.jpg",
           "i-LIDS_Pedestrian/Persons/0001003.jpg", "i-LIDS_Pedestrian/Persons/0002001.jpg",
           "i-LIDS_Pedestrian/Persons/0002002.jpg", "i-LIDS_Pedestrian/Persons/0003001.jpg"),
    required_folder="i-LIDS_Pedestrian/Persons",
    malformed="i-LIDS_Pedestrian/Persons/0004_001.jpg",
    link="i-LIDS_Pedestrian/Persons/0009001.jpg",
)
TREES = [PERSONX, CUHK02, CUHK_SYSU, PRID, GRID, VIPER, ILIDS]


def test_personx_subsets(tmp_path: Path) -> None:
    root = PERSONX.build(tmp_path / "data")
    data = load_personx(root)
    assert (len(data.train), len(data.query), len(data.gallery)) == (5, 2, 3)
    assert data.train_identities == [1, 2, 3]  # the same person 1 in both subsets; pid 0 dropped
    # subset 5's c1, c3, c2 -> 24, 26, 25; subset 6's c2, c5 -> 31, 34
    assert [r.camid for r in data.train] == [24, 26, 25, 31, 34]
    assert cams(data.query) == {24, 31} and ids(data.gallery) == {100, 101}
    first = data.train[0]
    assert (first.pid, first.sequence, first.frame, first.split) == (1, 1, 10, "train")
    only_6 = load_personx(root / "PersonX_v1", variant="6")  # the PersonX_v1 folder itself as root
    assert (len(only_6.train), len(only_6.query), len(only_6.gallery)) == (2, 1, 1)
    assert all("/6/" in r.path for r in only_6.train + only_6.query + only_6.gallery)
    with pytest.raises(DatasetError, match=r"3/"):
        load_personx(root, variant="3")
    with pytest.raises(ValueError, match="variant '7'"):
        SourceConfig(kind="personx", root=root, variant="7")


def test_personx_camera_beyond_six(tmp_path: Path) -> None:
    root = PERSONX.build(tmp_path / "data")
    save_images(root, ["PersonX_v1/5/query/0100_c7s1_000001_00.jpg"])
    with pytest.raises(DatasetError, match=r"0100_c7s1.*c1\.\.c6"):
        load_personx(root)


def test_cuhk02_all_training(tmp_path: Path) -> None:
    root = CUHK02.build(tmp_path / "data")
    data = load_cuhk02(root)
    assert (len(data.train), len(data.query), len(data.gallery)) == (21, 0, 0)
    assert data.train_identities == [p * 1000 + n for p in range(1, 6) for n in (1, 2)]  # unique across pairs
    assert cams(data.train) == set(range(10))
    by_name = {r.path.split("Dataset/")[1]: r for r in data.train}
    assert (by_name["P1/cam1/001_1.png"].pid, by_name["P1/cam1/001_1.png"].camid) == (1001, 0)
    assert (by_name["P3/cam2/002_2.png"].pid, by_name["P3/cam2/002_2.png"].camid) == (3002, 5)
    assert by_name["P5/cam2/001_2.png"].camid == 9
    assert protocol_for("cuhk02") is None  # a DG source only


def test_cuhk02_p5_test_variant(tmp_path: Path) -> None:
    root = CUHK02.build(tmp_path / "data")
    data = load_cuhk02(root / "Dataset", variant="p5-test")  # the Dataset folder itself as root
    assert (len(data.train), len(data.query), len(data.gallery)) == (17, 2, 2)
    assert ids(data.query) == ids(data.gallery) == {5001, 5002}
    assert cams(data.query) == {8} and cams(data.gallery) == {9}
    assert 5001 not in data.train_identities


def test_cuhk02_number_too_long(tmp_path: Path) -> None:
    root = CUHK02.build(tmp_path / "data")
    save_images(root, ["Dataset/P2/cam1/1234_1.png"])
    with pytest.raises(DatasetError, match="1234_1.png.*three digits"):
        load_cuhk02(root)


def test_cuhk_sysu_crops(tmp_path: Path) -> None:
    root = CUHK_SYSU.build(tmp_path / "data")
    data = load_cuhk_sysu(root)
    assert (len(data.train), len(data.query), len(data.gallery)) == (4, 0, 0)
    assert data.train_identities == [17, 18, 11422]
    assert cams(data.train) == {0}
    assert len(load_cuhk_sysu(root / "cropped_images").train) == 4  # the crops folder itself as root
    assert protocol_for("cuhk_sysu") is None


def test_prid_single_shot(tmp_path: Path) -> None:
    root = PRID.build(tmp_path / "data")
    data = load_prid(root)
    assert (len(data.train), len(data.query), len(data.gallery)) == (11, 0, 0)
    assert data.train_identities == [1, 2, 3, 4, 5, 6, 7, 8]
    assert ids([r for r in data.train if r.camid == 0]) == {1, 2, 3, 4, 5}
    assert ids([r for r in data.train if r.camid == 1]) == {1, 2, 3, 6, 7, 8}
    assert len(load_prid(root / "prid_2011").train) == 11  # prid_2011 itself as root
    # beyond 200, a number names another person in each camera
    save_images(root, ["prid_2011/single_shot/cam_a/person_0201.png", "prid_2011/single_shot/cam_b/person_0201.png"])
    beyond = {(r.pid, r.camid) for r in load_prid(root).train if r.path.endswith("person_0201.png")}
    assert beyond == {(1201, 0), (201, 1)}


def test_prid_person_zero_refused(tmp_path: Path) -> None:
    root = PRID.build(tmp_path / "data")
    save_images(root, ["prid_2011/single_shot/cam_a/person_0000.png"])
    with pytest.raises(DatasetError, match="person_0000.png: person numbers start at 1"):
        load_prid(root)


def test_grid_probe_gallery(tmp_path: Path) -> None:
    root = GRID.build(tmp_path / "data")
    data = load_grid(root)
    assert (len(data.train), len(data.query), len(data.gallery)) == (6, 0, 2)
    assert data.train_identities == [1, 2, 3]
    assert all(r.distractor and r.pid == 0 for r in data.gallery)  # the 0000 images, kept for the gallery
    first = data.train[0]  # gallery/ is listed after probe/: 0001_1_25004 is the first probe image
    assert (first.pid, first.camid, first.frame) == (1, 0, 25004) and "/probe/" in first.path
    assert cams(data.train) == {0, 2, 3, 4, 5, 7}


def test_grid_camera_zero_refused(tmp_path: Path) -> None:
    root = GRID.build(tmp_path / "data")
    save_images(root, ["underground_reid/probe/0004_0_25300_1_1_1_1.jpeg"])
    with pytest.raises(DatasetError, match="0004_0_25300.*camera numbers start at 1"):
        load_grid(root)


def test_viper_pairs(tmp_path: Path) -> None:
    root = VIPER.build(tmp_path / "data")
    data = load_viper(root)
    assert (len(data.train), len(data.query), len(data.gallery)) == (8, 0, 0)
    assert data.train_identities == [1, 2, 3, 6]  # NNN + 1: VIPeR's person 000 is not a distractor
    assert [(r.pid, r.camid) for r in data.train[:4]] == [(1, 0), (2, 0), (3, 0), (6, 0)]
    assert cams(data.train[4:]) == {1}
    assert len(load_viper(root / "VIPeR").train) == 8


def test_ilids_pseudo_cameras(tmp_path: Path) -> None:
    root = ILIDS.build(tmp_path / "data")
    data = load_ilids(root)
    assert (len(data.train), len(data.query), len(data.gallery)) == (6, 0, 0)
    assert data.train_identities == [1, 2, 3]
    # each image of a person gets its own pseudo-camera, by position; the name's index is the frame
    assert [(r.pid, r.camid, r.frame) for r in data.train] == [
        (1, 0, 1), (1, 1, 2), (1, 2, 3), (2, 0, 1), (2, 1, 2), (3, 0, 1),
    ]
    assert len(load_ilids(root / "i-LIDS_Pedestrian").train) == 6
    assert len(load_ilids(root / "i-LIDS_Pedestrian" / "Persons").train) == 6


def test_ilids_person_zero_refused(tmp_path: Path) -> None:
    root = ILIDS.build(tmp_path / "data")
    save_images(root, ["i-LIDS_Pedestrian/Persons/0000001.jpg"])
    with pytest.raises(DatasetError, match="0000001.jpg: person numbers start at 0001"):
        load_ilids(root)


@pytest.mark.parametrize("tree", TREES, ids=lambda t: t.kind)
def test_load_source_dispatch(tree: Tree, tmp_path: Path) -> None:
    root = tree.build(tmp_path / "data")
    data = load_source(SourceConfig(kind=tree.kind, root=root, name=f"my-{tree.kind}"))
    everything = data.train + data.query + data.gallery
    assert len(everything) == len(tree.files) - (1 if tree.kind == "personx" else 0)  # PersonX's pid 0 train image
    assert {r.source for r in everything} == {f"my-{tree.kind}"}
    assert data.name == f"my-{tree.kind}"
    assert all(Path(r.path).is_absolute() and Path(r.path).is_relative_to(root.resolve()) for r in everything)
    assert all(r.camid >= 0 for r in everything)


@pytest.mark.parametrize("tree", TREES, ids=lambda t: t.kind)
def test_missing_folder_refused(tree: Tree, tmp_path: Path) -> None:
    root = tree.build(tmp_path / "data")
    shutil.rmtree(root / tree.required_folder)
    with pytest.raises(DatasetError, match=Path(tree.required_folder).name):
        load_source(SourceConfig(kind=tree.kind, root=root))
    with pytest.raises(DatasetError, match="nowhere"):
        load_source(SourceConfig(kind=tree.kind, root=tmp_path / "nowhere"))


@pytest.mark.parametrize("tree", TREES, ids=lambda t: t.kind)
def test_malformed_name_refused(tree: Tree, tmp_path: Path) -> None:
    root = tree.build(tmp_path / "data")
    save_images(root, [tree.malformed])
    with pytest.raises(DatasetError) as caught:
        load_source(SourceConfig(kind=tree.kind, root=root))
    first, *problems = str(caught.value).splitlines()
    assert "1 problem" in first and "nothing was read" in first
    assert len(problems) == 1 and Path(tree.malformed).name in problems[0]


@pytest.mark.parametrize("tree", TREES, ids=lambda t: t.kind)
def test_symlink_escaping_root_refused(tree: Tree, tmp_path: Path) -> None:
    root = tree.build(tmp_path / "data")
    outside = save_images(tmp_path / "outside", [Path(tree.link).name]) / Path(tree.link).name
    (root / tree.link).symlink_to(outside)
    with pytest.raises(DatasetError, match=f"{Path(tree.link).name}.*escapes"):
        load_source(SourceConfig(kind=tree.kind, root=root))


@pytest.mark.parametrize("tree", TREES, ids=lambda t: t.kind)
def test_folder_linked_outside_refused(tree: Tree, tmp_path: Path) -> None:
    root = tree.build(tmp_path / "data")
    folder = root / tree.required_folder
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(folder, elsewhere)
    shutil.rmtree(folder)
    folder.symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(DatasetError, match="escapes"):
        load_source(SourceConfig(kind=tree.kind, root=root))


@pytest.mark.parametrize("tree", TREES, ids=lambda t: t.kind)
def test_empty_tree_refused(tree: Tree, tmp_path: Path) -> None:
    root = tmp_path / "data"
    for folder in tree.folders():
        (root / folder).mkdir(parents=True)
    with pytest.raises(DatasetError, match="no training identities"):
        load_source(SourceConfig(kind=tree.kind, root=root))


# ---------------------------------------------------------------------------------------------
# Full-size trees: the protocol's standard numbers


@pytest.fixture(scope="module")
def full_size(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ReidDataset]:
    """VIPeR, PRID, GRID and i-LIDS at their real sizes (empty files), loaded."""
    base = tmp_path_factory.mktemp("full")
    viper = [f"VIPeR/cam_{cam}/{n:03d}_{angle}.bmp" for n in range(632) for cam, angle in (("a", 0), ("b", 90))]
    prid = [f"prid_2011/single_shot/cam_a/person_{n:04d}.png" for n in range(1, 386)]
    prid += [f"prid_2011/single_shot/cam_b/person_{n:04d}.png" for n in range(1, 750)]
    grid = [f"underground_reid/probe/{n:04d}_{n % 8 + 1}_{n}_1_2_3_4.jpeg" for n in range(1, 251)]
    grid += [f"underground_reid/gallery/{n:04d}_{(n + 3) % 8 + 1}_{n}_1_2_3_4.jpeg" for n in range(1, 251)]
    grid += [f"underground_reid/gallery/0000_{n % 8 + 1}_{1000 + n}_1_2_3_4.jpeg" for n in range(775)]
    ilids = [f"i-LIDS_Pedestrian/Persons/{n:04d}{i:03d}.jpg" for n in range(1, 120) for i in range(1, 5)]
    trees = {"viper": viper, "prid": prid, "grid": grid, "ilids": ilids}
    return {
        kind: load_source(SourceConfig(kind=kind, root=touch(base / kind, files)))
        for kind, files in trees.items()
    }


def check_split_invariants(split: ReidDataset) -> None:
    """Query and gallery disjoint; every query has a true match from another camera; no test
    identity in train; splits recorded on the records."""
    query_paths = {r.path for r in split.query}
    assert not query_paths & {r.path for r in split.gallery}
    assert not query_paths & {r.path for r in split.train}
    for q in split.query:
        assert any(g.pid == q.pid and g.camid != q.camid for g in split.gallery), q
    assert not ids(split.query) & ids(split.train)
    assert not any(r.distractor for r in split.train + split.query)
    for name in ("train", "query", "gallery"):
        assert all(r.split == name for r in getattr(split, name))


def test_standard_numbers(full_size: dict[str, ReidDataset]) -> None:
    viper = splits.test_split(full_size["viper"], protocol_for("viper"), seed=0)
    assert (len(ids(viper.query)), len(ids(viper.gallery)), len(ids(viper.train))) == (316, 316, 316)
    assert (len(viper.query), len(viper.gallery)) == (316, 316)
    assert cams(viper.query) == {0} and cams(viper.gallery) == {1}
    assert ids(viper.query) == ids(viper.gallery)

    prid = splits.test_split(full_size["prid"], protocol_for("prid"), seed=0)
    assert len(ids(prid.query)) == 100 and ids(prid.query) <= set(range(1, 201))
    assert len(ids(prid.gallery)) == 649 and set(range(201, 750)) <= ids(prid.gallery)
    assert ids(prid.query) < ids(prid.gallery) and cams(prid.gallery) == {1}
    # cam_a's persons beyond 200 are other people than cam_b's of the same number: pid 1000 + n
    assert ids(prid.train) == (set(range(1, 201)) - ids(prid.query)) | set(range(1201, 1386))

    grid = splits.test_split(full_size["grid"], protocol_for("grid"), seed=0)
    assert (len(grid.query), len(ids(grid.query))) == (125, 125)
    assert all("/probe/" in r.path for r in grid.query) and all("/gallery/" in r.path for r in grid.gallery)
    assert len(grid.gallery) == 125 + 775 and sum(r.distractor for r in grid.gallery) == 775
    assert len(ids(grid.train)) == 125 and not any(r.distractor for r in grid.train)

    ilids = splits.test_split(full_size["ilids"], protocol_for("ilids"), seed=0)
    assert (len(ilids.query), len(ilids.gallery)) == (60, 60)
    assert ids(ilids.query) == ids(ilids.gallery) and len(ids(ilids.train)) == 59
    assert len(ilids.train) == 59 * 4  # the test identities' other two images are left out
    for split in (viper, prid, grid, ilids):
        check_split_invariants(split)


def test_splits_are_deterministic_and_vary(full_size: dict[str, ReidDataset]) -> None:
    viper, protocol = full_size["viper"], protocol_for("viper")
    first = splits.test_splits(viper, protocol, seed=3)
    assert len(first) == 10
    assert first == splits.test_splits(viper, protocol, seed=3)
    query_sets = [frozenset(ids(s.query)) for s in first]
    assert len(set(query_sets)) == 10  # every index draws other identities
    other_seed = splits.test_splits(viper, protocol, seed=4, count=2)
    assert [frozenset(ids(s.query)) for s in other_seed] != query_sets[:2]
    assert splits.test_split(viper, protocol, seed=3, index=7) == first[7]
    for split in first:
        check_split_invariants(split)


def test_splits_ignore_record_order(full_size: dict[str, ReidDataset]) -> None:
    for kind in ("ilids", "grid"):
        dataset = full_size[kind]
        records = dataset.train + dataset.query + dataset.gallery
        random.Random(0).shuffle(records)
        shuffled = ReidDataset(
            name=dataset.name, root=dataset.root,
            train=[r for r in records if r.split == "train"], gallery=[r for r in records if r.split == "gallery"],
        )
        assert splits.test_split(shuffled, protocol_for(kind), seed=1, index=2) == splits.test_split(
            dataset, protocol_for(kind), seed=1, index=2
        )


def test_ilids_one_image_each_from_another_camera(full_size: dict[str, ReidDataset]) -> None:
    for split in splits.test_splits(full_size["ilids"], protocol_for("ilids"), seed=0, count=3):
        assert len(split.query) == len(ids(split.query)) == 60
        query_of = {r.pid: r for r in split.query}
        for g in split.gallery:
            assert g.camid != query_of[g.pid].camid and g.path != query_of[g.pid].path


def test_small_dataset_uses_half_the_eligible(tmp_path: Path) -> None:
    data = load_prid(PRID.build(tmp_path / "data"))  # 3 people in both cameras, 2 in cam_a only, 3 in cam_b only
    split = splits.test_split(data, protocol_for("prid"), seed=0)
    assert len(ids(split.query)) == 1  # half of 3, at least 1 (the protocol asks for 100)
    assert ids(split.query) <= {1, 2, 3}
    assert {6, 7, 8} <= ids(split.gallery)  # seen only by the gallery camera
    assert ids(split.train) == ({1, 2, 3} - ids(split.query)) | {4, 5}
    check_split_invariants(split)
    grid = splits.test_split(load_grid(GRID.build(tmp_path / "grid")), protocol_for("grid"), seed=0)
    assert len(ids(grid.query)) == 1 and sum(r.distractor for r in grid.gallery) == 2
    check_split_invariants(grid)


def test_no_eligible_identity(tmp_path: Path) -> None:
    root = save_images(tmp_path / "viper", [f"VIPeR/cam_a/{n:03d}_45.bmp" for n in range(3)])
    (root / "VIPeR/cam_b").mkdir()
    only_cam_a = load_viper(root)
    with pytest.raises(DatasetError, match="no identity is eligible for testing"):
        splits.test_split(only_cam_a, protocol_for("viper"), seed=0)
    crops = load_cuhk_sysu(CUHK_SYSU.build(tmp_path / "sysu"))  # train only: no test pool to resample
    with pytest.raises(DatasetError, match="no identity is eligible for testing"):
        splits.test_split(crops, None, seed=0)


def test_protocol_validation() -> None:
    with pytest.raises(ValueError, match="overlap"):
        TestProtocol(test_ids=5, query_cameras=(0, 1), gallery_cameras=(1,))
    with pytest.raises(ValueError, match="both"):
        TestProtocol(test_ids=5, query_cameras=(0,))
    with pytest.raises(ValueError, match="one_image_per_id"):
        TestProtocol(test_ids=5)
    with pytest.raises(ValueError, match="test_ids"):
        TestProtocol(test_ids=0, one_image_per_id=True)
    assert protocol_for("market1501") is None and protocol_for("synthetic") is None


# ---------------------------------------------------------------------------------------------
# protocol=None: resampling the test pool of a dataset with its own query/gallery


MARKET_FILES = [
    "bounding_box_train/0002_c1s1_000451_03.jpg",
    "bounding_box_train/0002_c2s1_000551_01.jpg",
    "query/0003_c1s1_000001_00.jpg",
    "query/0004_c2s1_000002_00.jpg",
    "query/0005_c1s1_000003_00.jpg",
    "bounding_box_test/0003_c2s1_000003_00.jpg",
    "bounding_box_test/0003_c5s2_000004_01.jpg",
    "bounding_box_test/0004_c3s1_000005_00.jpg",
    "bounding_box_test/0005_c1s1_000006_00.jpg",  # person 5: one camera only, no cross-camera match
    "bounding_box_test/0006_c4s1_000007_00.jpg",  # gallery-only person
    "bounding_box_test/0000_c1s1_000008_00.jpg",
    "bounding_box_test/0000_c3s1_000009_00.jpg",
]


def test_resampled_test_pool(tmp_path: Path) -> None:
    data = load_market1501(save_images(tmp_path / "market", MARKET_FILES))
    pool = names(data.query + data.gallery)
    query_sets = set()
    for split in splits.test_splits(data, None, seed=0):
        assert split.train == data.train  # untouched
        assert ids(split.query) == {3, 4} and len(split.query) == 2  # one image each, two cameras seen
        assert names(split.query + split.gallery) == pool  # the pool, redistributed
        assert {5, 6} <= ids(split.gallery) and sum(r.distractor for r in split.gallery) == 2
        check_split_invariants(split)
        query_sets.add(tuple(names(split.query)))
    assert len(query_sets) > 1  # person 3 has three images: the query varies between splits
    assert splits.test_splits(data, None, seed=0) == splits.test_splits(data, None, seed=0)


def test_resampling_needs_an_identity_seen_twice(tmp_path: Path) -> None:
    one_camera = MARKET_FILES[:3] + ["bounding_box_test/0003_c1s1_000003_00.jpg"]  # person 3 seen by c1 only
    data = load_market1501(save_images(tmp_path / "market", one_camera))
    with pytest.raises(DatasetError, match="seen by two cameras"):
        splits.test_split(data, None, seed=0)
