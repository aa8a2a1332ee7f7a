"""Tests for the synthetic COCO dataset generator and validator (dfmsd.data)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dfmsd import data
from dfmsd.data import CLASS_NAMES, DatasetError, generate_dataset, validate_coco

IMAGE_SIZE = 96
NUM_TRAIN = 40
SMALL_FRACTION = 0.4


def tree_digests(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, keyed by relative path."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def load_split(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


def boxes_per_image(coco: dict) -> dict[int, list[list[float]]]:
    boxes = {img["id"]: [] for img in coco["images"]}
    for ann in coco["annotations"]:
        boxes[ann["image_id"]].append(ann["bbox"])
    return boxes


def summed_area_ratio(boxes, width, height) -> float:
    return sum(w * h for _, _, w, h in boxes) / (width * height)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A small dataset shared by the read-only tests: (root, summary)."""
    root = tmp_path_factory.mktemp("gen") / "shapes"
    summary = generate_dataset(root, num_train=NUM_TRAIN, num_val=10, image_size=IMAGE_SIZE, seed=3,
                               small_image_fraction=SMALL_FRACTION, progress=False)
    return root, summary


# ---------------------------------------------------------------- determinism


def test_same_seed_gives_byte_identical_files(tmp_path):
    kwargs = dict(num_train=6, num_val=3, image_size=64, seed=11, progress=False)
    generate_dataset(tmp_path / "a", **kwargs)
    generate_dataset(tmp_path / "b", **kwargs)
    digests_a, digests_b = tree_digests(tmp_path / "a"), tree_digests(tmp_path / "b")
    assert len(digests_a) == 6 + 3 + 2
    assert digests_a == digests_b


def test_different_seeds_give_different_data(tmp_path):
    kwargs = dict(num_train=6, num_val=3, image_size=64, progress=False)
    generate_dataset(tmp_path / "a", seed=1, **kwargs)
    generate_dataset(tmp_path / "b", seed=2, **kwargs)
    digests_a, digests_b = tree_digests(tmp_path / "a"), tree_digests(tmp_path / "b")
    assert digests_a.keys() == digests_b.keys()
    differing = [name for name in digests_a if digests_a[name] != digests_b[name]]
    assert len(differing) == len(digests_a)  # every image and both annotation files


def test_train_and_val_use_different_seeds(dataset):
    root, _ = dataset
    assert (root / "train" / "000001.png").read_bytes() != (root / "val" / "000001.png").read_bytes()


# ---------------------------------------------------------------- format


def test_layout_and_pycocotools_loads(dataset):
    from pycocotools.coco import COCO

    root, summary = dataset
    for split, count in (("train", NUM_TRAIN), ("val", 10)):
        coco = COCO(str(root / "annotations" / f"instances_{split}.json"))
        assert len(coco.getImgIds()) == count
        assert coco.getCatIds() == [1, 2, 3, 4, 5]
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLASS_NAMES)
        assert len(coco.getAnnIds()) == summary[split]["annotations"] > 0
        for img in coco.loadImgs(coco.getImgIds()):
            assert "/" not in img["file_name"]
            with Image.open(root / split / img["file_name"]) as pil:
                assert pil.size == (img["width"], img["height"]) == (IMAGE_SIZE, IMAGE_SIZE)
                assert pil.mode == "RGB"
            assert img["size_mode"] in ("small", "large")


def test_annotation_fields_and_unique_ids(dataset):
    root, _ = dataset
    coco = load_split(root, "train")
    ids = [ann["id"] for ann in coco["annotations"]]
    assert len(set(ids)) == len(ids)
    for ann in coco["annotations"]:
        assert ann["iscrowd"] == 0
        assert ann["area"] == pytest.approx(ann["bbox"][2] * ann["bbox"][3], abs=0.01)


def test_boxes_inside_image_with_positive_size(dataset):
    root, _ = dataset
    for split in ("train", "val"):
        coco = load_split(root, split)
        sizes = {img["id"]: (img["width"], img["height"]) for img in coco["images"]}
        for ann in coco["annotations"]:
            x, y, w, h = ann["bbox"]
            width, height = sizes[ann["image_id"]]
            assert w > 0 and h > 0
            assert x >= 0 and y >= 0
            assert x + w <= width + 1e-6 and y + h <= height + 1e-6


def test_several_classes_present_and_balanced(dataset):
    root, summary = dataset
    coco = load_split(root, "train")
    counts = np.bincount([ann["category_id"] for ann in coco["annotations"]], minlength=6)[1:]
    assert (counts > 0).sum() >= 4
    assert counts.max() < 0.5 * counts.sum()
    assert list(counts) == [summary["train"]["per_class"][name] for name in CLASS_NAMES]


# ---------------------------------------------------------------- size mix


def test_share_of_small_mode_images_matches_request(dataset):
    root, summary = dataset
    coco = load_split(root, "train")
    small = sum(img["size_mode"] == "small" for img in coco["images"])
    assert abs(small / NUM_TRAIN - SMALL_FRACTION) <= 0.05
    assert summary["train"]["size_mode_small"] == small


def test_area_ratio_agrees_with_size_mode(dataset):
    root, summary = dataset
    coco = load_split(root, "train")
    boxes = boxes_per_image(coco)
    ratios = {img["id"]: summed_area_ratio(boxes[img["id"]], img["width"], img["height"]) for img in coco["images"]}
    small = [ratios[img["id"]] for img in coco["images"] if img["size_mode"] == "small"]
    large = [ratios[img["id"]] for img in coco["images"] if img["size_mode"] == "large"]
    assert small and large
    assert np.mean(np.array(small) < 0.5) >= 0.9
    assert np.mean(np.array(large) >= 0.5) >= 0.9
    # Small-mode images hold several objects, large-mode ones at least one.
    assert np.mean([len(boxes[img["id"]]) for img in coco["images"] if img["size_mode"] == "small"]) >= 2.5
    assert all(boxes[img["id"]] for img in coco["images"])
    assert summary["train"]["small_dominated"] == sum(r < 0.5 for r in ratios.values())


def test_object_sizes_span_tiny_to_most_of_image(dataset):
    root, _ = dataset
    coco = load_split(root, "train")
    longest_sides = [max(ann["bbox"][2], ann["bbox"][3]) for ann in coco["annotations"]]
    assert min(longest_sides) < 8
    assert max(longest_sides) > IMAGE_SIZE / 2


def test_objects_stand_out_from_background(dataset):
    """The centre of a large object's box differs clearly in colour from the pixels
    outside every box: a weak proxy for "visible, learnable objects"."""
    root, _ = dataset
    coco = load_split(root, "train")
    boxes = boxes_per_image(coco)
    differences = []
    for img in coco["images"]:
        pixels = np.asarray(Image.open(root / "train" / img["file_name"]), dtype=np.float64)
        outside = np.ones(pixels.shape[:2], bool)
        for bx, by, bw, bh in boxes[img["id"]]:
            outside[int(by) : int(np.ceil(by + bh)), int(bx) : int(np.ceil(bx + bw))] = False
        if img["size_mode"] != "large" or outside.sum() < 100:
            continue
        x, y, w, h = (int(round(v)) for v in max(boxes[img["id"]], key=lambda b: b[2] * b[3]))
        centre = pixels[y + h // 3 : y + 2 * h // 3, x + w // 3 : x + 2 * w // 3].reshape(-1, 3).mean(axis=0)
        differences.append(np.linalg.norm(centre - pixels[outside].mean(axis=0)))
    assert len(differences) >= 5
    assert np.median(differences) > 40


# ---------------------------------------------------------------- behaviour


def test_summary_counts_match_files(dataset):
    root, summary = dataset
    for split in ("train", "val"):
        coco = load_split(root, split)
        assert summary[split]["images"] == len(coco["images"]) == len(list((root / split).glob("*.png")))
        assert summary[split]["annotations"] == len(coco["annotations"])
        assert summary[split]["small_dominated"] + summary[split]["large_dominated"] == len(coco["images"])


def test_existing_output_is_replaced(tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    generate_dataset(out, num_train=2, num_val=1, image_size=64, progress=False)
    assert not (out / "stale.txt").exists()
    assert (out / "annotations" / "instances_train.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temp dirs left


def test_crash_leaves_previous_output_untouched(tmp_path, monkeypatch):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "keep.txt").write_text("previous dataset")
    calls = []

    def failing_save(image, path):
        calls.append(path)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        Image.fromarray(image).save(path, format="PNG")

    monkeypatch.setattr(data, "save_png", failing_save)
    with pytest.raises(RuntimeError, match="disk full"):
        generate_dataset(out, num_train=5, num_val=1, image_size=64, progress=False)
    assert len(calls) == 3
    assert (out / "keep.txt").read_text() == "previous dataset"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_progress_lines_go_to_stderr(tmp_path, capsys):
    generate_dataset(tmp_path / "ds", num_train=3, num_val=1, image_size=64, progress=True)
    captured = capsys.readouterr()
    assert "train: 3/3" in captured.err and "val: 1/1" in captured.err
    assert captured.out == ""
    generate_dataset(tmp_path / "ds", num_train=3, num_val=1, image_size=64, progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("bad", [dict(small_image_fraction=1.5), dict(num_train=-1), dict(max_objects=0),
                                 dict(image_size=8), dict(seed=-1)])
def test_rejects_bad_arguments(tmp_path, bad):
    kwargs = dict(num_train=1, num_val=1, image_size=64, progress=False) | bad
    with pytest.raises(ValueError):
        generate_dataset(tmp_path / "ds", **kwargs)
    assert not (tmp_path / "ds").exists()


# ---------------------------------------------------------------- validate_coco


@pytest.fixture
def ann_copy(dataset, tmp_path):
    """A writable copy of the val annotations, still pointing at the real images."""
    root, _ = dataset
    path = tmp_path / "instances.json"
    path.write_text((root / "annotations" / "instances_val.json").read_text())
    return path, root / "val"


def rewrite(path: Path, change) -> None:
    coco = json.loads(path.read_text())
    change(coco)
    path.write_text(json.dumps(coco))


def test_validate_accepts_generated_data(dataset):
    root, summary = dataset
    coco = validate_coco(root / "annotations" / "instances_train.json", root / "train")
    assert len(coco["images"]) == NUM_TRAIN
    assert len(coco["annotations"]) == summary["train"]["annotations"]


def test_validate_missing_file(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(DatasetError, match="nope.json") as err:
        validate_coco(missing, tmp_path)
    assert isinstance(err.value, ValueError)


def test_validate_invalid_json(ann_copy):
    path, img_dir = ann_copy
    path.write_text('{"images": [')
    with pytest.raises(DatasetError, match="not valid JSON") as err:
        validate_coco(path, img_dir)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_validate_missing_section(ann_copy, key):
    path, img_dir = ann_copy
    rewrite(path, lambda coco: coco.pop(key))
    with pytest.raises(DatasetError, match=key) as err:
        validate_coco(path, img_dir)
    assert str(path) in str(err.value)


def test_validate_unknown_image_id(ann_copy):
    path, img_dir = ann_copy
    rewrite(path, lambda coco: coco["annotations"][0].update(image_id=999_999))
    with pytest.raises(DatasetError, match="unknown image_id 999999") as err:
        validate_coco(path, img_dir)
    assert str(path) in str(err.value)


def test_validate_unknown_category(ann_copy):
    path, img_dir = ann_copy
    rewrite(path, lambda coco: coco["annotations"][-1].update(category_id=42))
    with pytest.raises(DatasetError, match="unknown category_id 42") as err:
        validate_coco(path, img_dir)
    assert str(path) in str(err.value)


def test_validate_bad_bbox(ann_copy):
    path, img_dir = ann_copy
    rewrite(path, lambda coco: coco["annotations"][0].update(bbox=[1, 2, 0, 5]))
    with pytest.raises(DatasetError, match="invalid bbox") as err:
        validate_coco(path, img_dir)
    assert str(path) in str(err.value)


def test_validate_missing_image_file(ann_copy):
    path, img_dir = ann_copy
    rewrite(path, lambda coco: coco["images"][1].update(file_name="ghost.png"))
    with pytest.raises(DatasetError) as err:
        validate_coco(path, img_dir)
    assert str(path) in str(err.value)
    assert str(img_dir / "ghost.png") in str(err.value)
