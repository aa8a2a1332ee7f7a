"""Tests for the masking-enhancement augmentation (dfmsd.augment)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dfmsd.augment import add_gaussian_noise, area_ratio, augment_dataset, crop_boxes, random_crop_window
from dfmsd.data import DatasetError, generate_dataset, validate_coco

CROP_MIN, CROP_MAX = 0.1, 0.3


def read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def file_digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def gt_area_ratios(coco: dict) -> dict[int, float]:
    """r(I) from ground-truth boxes, standing in for the teacher's boxes."""
    boxes = {img["id"]: [] for img in coco["images"]}
    for ann in coco["annotations"]:
        boxes[ann["image_id"]].append(ann["bbox"])
    return {img["id"]: area_ratio(boxes[img["id"]], img["width"], img["height"]) for img in coco["images"]}


def write_grey_dataset(root: Path, count: int, size: int, grey: int = 128) -> tuple[Path, Path]:
    """``count`` uniform grey images with one box each, as a COCO dataset."""
    img_dir = root / "images"
    img_dir.mkdir(parents=True)
    images, annotations = [], []
    for image_id in range(1, count + 1):
        Image.fromarray(np.full((size, size, 3), grey, np.uint8)).save(img_dir / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": size, "height": size})
        annotations.append({"id": image_id, "image_id": image_id, "category_id": 1, "bbox": [1, 1, 4, 4],
                            "area": 16, "iscrowd": 0})
    ann_file = root / "instances.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations,
                                    "categories": [{"id": 1, "name": "thing"}]}))
    return ann_file, img_dir


# ---------------------------------------------------------------- pure functions


def test_area_ratio_by_hand():
    # (10*10 + 20*10) / (40*20) = 300 / 800
    assert area_ratio([[0, 0, 10, 10], [5, 5, 20, 10]], 40, 20) == pytest.approx(0.375)
    # Overlapping boxes count twice, so r can exceed 1.
    assert area_ratio([[0, 0, 40, 20], [0, 0, 40, 20]], 40, 20) == pytest.approx(2.0)
    assert area_ratio([], 40, 20) == 0.0
    with pytest.raises(ValueError):
        area_ratio([[0, 0, 1, 1]], 0, 20)


def test_crop_boxes_hand_worked():
    # Window covers x in [10, 60), y in [20, 60).
    boxes = [
        [15, 25, 10, 10],  # fully inside -> shifted by (-10, -20)
        [50, 30, 20, 10],  # x 50..70 straddles the right edge: keeps x 50..60, half its area
        [55, 50, 20, 20],  # keeps 5 x 10 = 50 of 400 px (12.5% < 30%): remnant, dropped
        [0, 0, 5, 5],  # entirely outside: dropped
        [10, 20, 1.5, 2],  # inside but 3 px < min_box_area 4: dropped
    ]
    kept, keep_index = crop_boxes(boxes, 10, 20, 50, 40, min_box_area=4.0, min_visible=0.3)
    assert keep_index.tolist() == [0, 1]
    np.testing.assert_allclose(kept, [[5, 5, 10, 10], [40, 10, 10, 10]])


def test_crop_boxes_clips_top_left_and_respects_min_visible():
    # Box x -5..15 in window-relative terms after a crop at (5, 5): loses 5 px left, 5 px top.
    kept, keep_index = crop_boxes([[0, 0, 20, 20]], 5, 5, 100, 100, min_box_area=1.0, min_visible=0.5)
    np.testing.assert_allclose(kept, [[0, 0, 15, 15]])  # 225 / 400 = 56% visible: kept
    kept, keep_index = crop_boxes([[0, 0, 20, 20]], 5, 5, 100, 100, min_box_area=1.0, min_visible=0.6)
    assert kept.shape == (0, 4) and keep_index.shape == (0,)


def test_crop_boxes_empty_input():
    kept, keep_index = crop_boxes([], 0, 0, 10, 10, min_box_area=4.0, min_visible=0.3)
    assert kept.shape == (0, 4) and keep_index.shape == (0,)


def test_random_crop_window_removes_requested_fraction():
    rng = np.random.default_rng(0)
    lefts = []
    for _ in range(300):
        x0, y0, w, h = random_crop_window(rng, 100, 80, CROP_MIN, CROP_MAX)
        assert CROP_MIN * 100 - 1 <= 100 - w <= CROP_MAX * 100 + 1
        assert CROP_MIN * 80 - 1 <= 80 - h <= CROP_MAX * 80 + 1
        assert 0 <= x0 and x0 + w <= 100 and 0 <= y0 and y0 + h <= 80
        lefts.append(x0 / (100 - w))
    # The removed strip is split between both sides, not always taken from one.
    assert 0.35 < np.mean(lefts) < 0.65 and min(lefts) < 0.2 and max(lefts) > 0.8


def test_add_gaussian_noise_std_on_mid_grey():
    grey = np.full((128, 128, 3), 128, np.uint8)
    noisy = add_gaussian_noise(np.random.default_rng(5), grey, sigma=25.0)
    diff = noisy.astype(np.float64) - 128
    assert noisy.dtype == np.uint8 and noisy.shape == grey.shape
    assert abs(diff.mean()) < 1.0
    assert diff.std() == pytest.approx(25.0, rel=0.05)


# ---------------------------------------------------------------- augment_dataset


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A tiny generated dataset and its ground-truth r(I): (ann_file, img_dir, coco, ratios)."""
    root = tmp_path_factory.mktemp("aug") / "shapes"
    generate_dataset(root, num_train=24, num_val=0, image_size=64, seed=7, progress=False)
    ann_file = root / "annotations" / "instances_train.json"
    coco = json.loads(ann_file.read_text())
    return ann_file, root / "train", coco, gt_area_ratios(coco)


@pytest.fixture(scope="module")
def augmented(shapes, tmp_path_factory):
    """The shapes dataset after ME with default settings: (out_dir, output coco, summary)."""
    ann_file, img_dir, _, ratios = shapes
    out = tmp_path_factory.mktemp("aug-out") / "me"
    summary = augment_dataset(ann_file, img_dir, ratios, out, seed=3, progress=False)
    return out, json.loads((out / "annotations.json").read_text()), summary


def find_crop_offset(original: np.ndarray, crop: np.ndarray) -> tuple[int, int]:
    """The (x0, y0) where ``crop`` sits inside ``original``; fails if it is not a sub-image."""
    h, w = crop.shape[:2]
    matches = [(x0, y0) for y0 in range(original.shape[0] - h + 1) for x0 in range(original.shape[1] - w + 1)
               if np.array_equal(original[y0 : y0 + h, x0 : x0 + w], crop)]
    assert len(matches) == 1, f"crop found at {len(matches)} offsets"
    return matches[0]


def test_output_is_valid_coco_with_preserved_ids(shapes, augmented):
    _, _, coco, ratios = shapes
    out, result, summary = augmented
    validate_coco(out / "annotations.json", out / "images")
    assert [img["id"] for img in result["images"]] == [img["id"] for img in coco["images"]]
    assert result["categories"] == coco["categories"]
    assert [ann["id"] for ann in result["annotations"]] == list(range(1, len(result["annotations"]) + 1))
    for img in result["images"]:
        assert img["area_ratio"] == pytest.approx(ratios[img["id"]])
    assert summary["images"] == len(result["images"])
    assert sum(summary["ops"].values()) == len(result["images"])
    assert summary["boxes_out"] == len(result["annotations"])
    assert summary["boxes_in"] - summary["boxes_dropped"] == summary["boxes_out"]


def test_small_ratio_images_are_noised_or_unchanged(shapes, augmented):
    _, img_dir, coco, ratios = shapes
    out, result, _ = augmented
    originals = {img["id"]: img for img in coco["images"]}
    small = [img for img in result["images"] if ratios[img["id"]] < 0.5]
    assert small
    for img in small:
        assert img["me_op"] in ("noise", "none")
        source = img_dir / originals[img["id"]]["file_name"]
        output = out / "images" / img["file_name"]
        assert (img["width"], img["height"]) == (originals[img["id"]]["width"], originals[img["id"]]["height"])
        if img["me_op"] == "none":
            assert output.read_bytes() == source.read_bytes()
        else:
            changed = read_rgb(output) != read_rgb(source)
            assert changed.mean() > 0.5  # sigma 25 moves nearly every pixel value
    input_boxes = sorted((a["image_id"], a["category_id"], a["bbox"]) for a in coco["annotations"]
                         if ratios[a["image_id"]] < 0.5)
    output_boxes = sorted((a["image_id"], a["category_id"], a["bbox"]) for a in result["annotations"]
                          if ratios[a["image_id"]] < 0.5)
    assert output_boxes == input_boxes


def test_large_ratio_images_are_cropped_with_matching_boxes(shapes, augmented):
    _, img_dir, coco, ratios = shapes
    out, result, _ = augmented
    originals = {img["id"]: img for img in coco["images"]}
    large = [img for img in result["images"] if ratios[img["id"]] >= 0.5]
    assert large
    for img in large:
        assert img["me_op"] == "crop"
        source = originals[img["id"]]
        assert CROP_MIN * source["width"] - 1 <= source["width"] - img["width"] <= CROP_MAX * source["width"] + 1
        assert CROP_MIN * source["height"] - 1 <= source["height"] - img["height"] <= CROP_MAX * source["height"] + 1
        crop = read_rgb(out / "images" / img["file_name"])
        assert crop.shape[:2] == (img["height"], img["width"])  # cropped, not resized back
        x0, y0 = find_crop_offset(read_rgb(img_dir / source["file_name"]), crop)
        source_boxes = [a["bbox"] for a in coco["annotations"] if a["image_id"] == img["id"]]
        expected, _ = crop_boxes(source_boxes, x0, y0, img["width"], img["height"], 4.0, 0.3)
        got = [a["bbox"] for a in result["annotations"] if a["image_id"] == img["id"]]
        np.testing.assert_allclose(np.array(got).reshape(-1, 4), expected, atol=0.011)


def test_all_output_boxes_inside_their_image(augmented):
    _, result, _ = augmented
    sizes = {img["id"]: (img["width"], img["height"]) for img in result["images"]}
    for ann in result["annotations"]:
        x, y, w, h = ann["bbox"]
        width, height = sizes[ann["image_id"]]
        assert w > 0 and h > 0 and x >= 0 and y >= 0
        assert x + w <= width + 1e-6 and y + h <= height + 1e-6
        assert ann["area"] == pytest.approx(w * h, abs=0.01)


def test_deterministic_from_seed(shapes, augmented, tmp_path):
    ann_file, img_dir, _, ratios = shapes
    out, _, _ = augmented
    augment_dataset(ann_file, img_dir, ratios, tmp_path / "again", seed=3, progress=False)
    augment_dataset(ann_file, img_dir, ratios, tmp_path / "other", seed=4, progress=False)
    assert file_digests(tmp_path / "again") == file_digests(out)
    assert file_digests(tmp_path / "other") != file_digests(out)


def test_noise_std_matches_sigma_on_grey_images(tmp_path):
    # Images missing from area_ratios count as r = 0, so all are small-object images.
    ann_file, img_dir = write_grey_dataset(tmp_path / "grey", count=4, size=64)
    augment_dataset(ann_file, img_dir, {}, tmp_path / "out", noise_prob=1.0, noise_sigma=20.0, progress=False)
    result = json.loads((tmp_path / "out" / "annotations.json").read_text())
    for img in result["images"]:
        assert img["me_op"] == "noise" and img["area_ratio"] == 0.0
        diff = read_rgb(tmp_path / "out" / "images" / img["file_name"]).astype(np.float64) - 128
        assert abs(diff.mean()) < 1.0
        assert diff.std() == pytest.approx(20.0, rel=0.08)


def test_noise_frequency_close_to_probability(tmp_path):
    ann_file, img_dir = write_grey_dataset(tmp_path / "grey", count=300, size=4)
    summary = augment_dataset(ann_file, img_dir, {}, tmp_path / "out", noise_prob=0.3, progress=False)
    assert summary["ops"]["crop"] == 0
    assert summary["ops"]["noise"] + summary["ops"]["none"] == 300
    assert abs(summary["ops"]["noise"] / 300 - 0.3) < 0.08  # binomial std is 0.026


def test_threshold_and_probability_extremes(tmp_path):
    ann_file, img_dir = write_grey_dataset(tmp_path / "grey", count=6, size=16)
    ratios = {1: 0.49, 2: 0.5, 3: 2.0, 4: 0.0, 5: 0.7}  # image 6 missing: counts as small
    summary = augment_dataset(ann_file, img_dir, ratios, tmp_path / "out", noise_prob=0.0, progress=False)
    result = json.loads((tmp_path / "out" / "annotations.json").read_text())
    ops = {img["id"]: img["me_op"] for img in result["images"]}
    assert ops == {1: "none", 2: "crop", 3: "crop", 4: "none", 5: "crop", 6: "none"}
    assert summary["ops"] == {"noise": 0, "none": 3, "crop": 3}


def test_area_ratio_keys_may_be_strings(tmp_path):
    ann_file, img_dir = write_grey_dataset(tmp_path / "grey", count=2, size=16)
    augment_dataset(ann_file, img_dir, {"1": 0.9, "2": 0.1}, tmp_path / "out", noise_prob=0.0, progress=False)
    result = json.loads((tmp_path / "out" / "annotations.json").read_text())
    assert [(img["me_op"], img["area_ratio"]) for img in result["images"]] == [("crop", 0.9), ("none", 0.1)]


def test_bad_input_and_arguments(tmp_path):
    with pytest.raises(DatasetError, match="missing.json"):
        augment_dataset(tmp_path / "missing.json", tmp_path, {}, tmp_path / "out", progress=False)
    ann_file, img_dir = write_grey_dataset(tmp_path / "grey", count=1, size=8)
    with pytest.raises(ValueError):
        augment_dataset(ann_file, img_dir, {}, tmp_path / "out", crop_min=0.4, crop_max=0.2, progress=False)
    with pytest.raises(ValueError):
        augment_dataset(ann_file, img_dir, {}, tmp_path / "out", noise_prob=1.5, progress=False)
    assert not (tmp_path / "out").exists()
