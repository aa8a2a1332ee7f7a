"""Masking-enhancement (ME) augmentation of a COCO training set, done once ahead of time.

For each training image the weak teacher's boxes (already filtered by score) give
r(I) = sum of box areas / (W * H). Then:

* r(I) < T ("small-object image"): with probability ``noise_prob`` add Gaussian
  noise N(0, sigma^2) on the 0-255 pixel scale (high-frequency enhancement);
  otherwise the image is copied unchanged.
* r(I) >= T ("large-object image"): crop a random fraction in
  [crop_min, crop_max] off the width and off the height, split randomly between
  the two sides; ground-truth boxes are clipped to the kept window and small
  remnants dropped. The image keeps its new, smaller size.

The output is a new COCO dataset (``images/*.png`` + ``annotations.json``) whose
image entries record the operation (``me_op``) and the ``area_ratio`` used.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from dfmsd.data import (DatasetError, ProgressReporter, atomic_directory, boxes_area_ratio, rounded_box, save_png,
                        validate_coco, write_json)

ME_OPS = ("noise", "none", "crop")


def area_ratio(boxes_xywh, width: int, height: int) -> float:
    """r(I): summed area of (x, y, w, h) boxes over the image area.

    Overlaps are counted twice, so the result can exceed 1; no boxes give 0.0.
    """
    return boxes_area_ratio(boxes_xywh, width, height)


def crop_boxes(boxes_xywh, crop_x0: float, crop_y0: float, crop_w: float, crop_h: float,
               min_box_area: float, min_visible: float) -> tuple[np.ndarray, np.ndarray]:
    """Clip boxes to a crop window and express them in the window's coordinates.

    A box is kept when its clipped part has positive width and height, an area of
    at least ``min_box_area`` pixels and at least ``min_visible`` of the original
    box's area. Returns ``(kept_boxes, keep_index)``: a (K, 4) float array of
    (x, y, w, h) boxes relative to (crop_x0, crop_y0), and the (K,) indices of the
    kept boxes in the input.
    """
    boxes = np.asarray(boxes_xywh, dtype=np.float64).reshape(-1, 4)
    x0 = np.maximum(boxes[:, 0], crop_x0)
    y0 = np.maximum(boxes[:, 1], crop_y0)
    x1 = np.minimum(boxes[:, 0] + boxes[:, 2], crop_x0 + crop_w)
    y1 = np.minimum(boxes[:, 1] + boxes[:, 3], crop_y0 + crop_h)
    w, h = x1 - x0, y1 - y0
    clipped_area = np.clip(w, 0, None) * np.clip(h, 0, None)
    original_area = boxes[:, 2] * boxes[:, 3]
    keep = (w > 0) & (h > 0) & (clipped_area >= min_box_area) & (clipped_area >= min_visible * original_area)
    keep_index = np.flatnonzero(keep)
    kept = np.stack([x0 - crop_x0, y0 - crop_y0, w, h], axis=1)[keep_index]
    return kept, keep_index


def random_crop_window(rng: np.random.Generator, width: int, height: int, crop_min: float,
                       crop_max: float) -> tuple[int, int, int, int]:
    """A random sub-rectangle (x0, y0, w, h) with a fraction in [crop_min, crop_max]
    of each side removed, the removed pixels split randomly between the two edges.
    At least one pixel is kept along each side."""

    def one_axis(length: int) -> tuple[int, int]:
        removed = min(int(round(rng.uniform(crop_min, crop_max) * length)), length - 1)
        before = int(round(rng.uniform(0, 1) * removed))
        return before, length - removed

    x0, w = one_axis(width)
    y0, h = one_axis(height)
    return x0, y0, w, h


def add_gaussian_noise(rng: np.random.Generator, image: np.ndarray, sigma: float) -> np.ndarray:
    """Add N(0, sigma^2) noise to a uint8 image (0-255 scale), round and clip back to uint8."""
    noisy = image.astype(np.float64) + rng.normal(0.0, sigma, size=image.shape)
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def _load_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _output_names(images: list[dict]) -> dict[int, str]:
    """A unique PNG name per image id: the source's stem, prefixed by the id on a clash."""
    names, used = {}, set()
    for img in images:
        name = Path(img["file_name"]).stem + ".png"
        if name in used:
            name = f"{img['id']}_{name}"
        used.add(name)
        names[img["id"]] = name
    return names


def _check_augment_args(threshold, noise_prob, noise_sigma, crop_min, crop_max, min_visible) -> None:
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    if not 0.0 <= noise_prob <= 1.0:
        raise ValueError(f"noise_prob must be in [0, 1], got {noise_prob}")
    if noise_sigma < 0:
        raise ValueError(f"noise_sigma must be >= 0, got {noise_sigma}")
    if not 0.0 <= crop_min <= crop_max < 1.0:
        raise ValueError(f"need 0 <= crop_min <= crop_max < 1, got crop_min={crop_min}, crop_max={crop_max}")
    if not 0.0 <= min_visible <= 1.0:
        raise ValueError(f"min_visible must be in [0, 1], got {min_visible}")


def augment_dataset(ann_file, img_dir, area_ratios: dict[int, float], out_dir, *, threshold: float = 0.5,
                    noise_prob: float = 0.5, noise_sigma: float = 25.0, crop_min: float = 0.1,
                    crop_max: float = 0.3, min_box_area: float = 4.0, min_visible: float = 0.3, seed: int = 0,
                    progress: bool = True) -> dict:
    """Apply masking enhancement to a COCO dataset and write the result to ``out_dir``.

    ``area_ratios`` maps image id to r(I) from the teacher's boxes; an image missing
    from it counts as r = 0, i.e. a small-object image (it can only be noised or
    copied). String keys (image ids read back from JSON) are accepted too.

    Output: ``out_dir/images/*.png`` and ``out_dir/annotations.json`` with the same
    categories, image ids preserved, annotation ids renumbered from 1, and extra
    image fields ``me_op`` ("noise" | "none" | "crop") and ``area_ratio``.
    Cropped boxes get ``area`` = new box area and lose any ``segmentation``. Each
    image's random draws come from ``(seed, image id)``, so results do not depend on
    image order. ``out_dir`` is replaced atomically.

    Returns ``{"images", "ops": {op: count}, "boxes_in", "boxes_out", "boxes_dropped", "out_dir"}``.
    """
    _check_augment_args(threshold, noise_prob, noise_sigma, crop_min, crop_max, min_visible)
    img_dir = Path(img_dir)
    coco = validate_coco(ann_file, img_dir)
    boxes_by_image: dict[int, list[dict]] = {img["id"]: [] for img in coco["images"]}
    for ann in coco["annotations"]:
        boxes_by_image[ann["image_id"]].append(ann)
    out_names = _output_names(coco["images"])

    images, annotations = [], []
    ops = {op: 0 for op in ME_OPS}
    reporter = ProgressReporter(len(coco["images"]), "masking enhancement", enabled=progress)
    with atomic_directory(out_dir) as root:
        (root / "images").mkdir()
        for img in coco["images"]:
            ratio = _ratio_of(area_ratios, img["id"])
            rng = np.random.default_rng([seed, img["id"]])
            source, target = img_dir / img["file_name"], root / "images" / out_names[img["id"]]
            new_img = {**img, "file_name": out_names[img["id"]]}
            anns = boxes_by_image[img["id"]]
            if ratio < threshold:
                new_img["me_op"] = _noise_or_copy(rng, source, target, noise_prob, noise_sigma)
                new_anns = [dict(ann) for ann in anns]
            else:
                new_img["me_op"] = "crop"
                new_anns = _crop_image(rng, source, target, new_img, anns, crop_min, crop_max,
                                       min_box_area, min_visible)
            new_img["area_ratio"] = ratio
            ops[new_img["me_op"]] += 1
            for ann in new_anns:
                ann["id"] = len(annotations) + 1
                annotations.append(ann)
            images.append(new_img)
            reporter.update()
        out = {key: value for key, value in coco.items() if key not in ("images", "annotations")}
        write_json({**out, "images": images, "annotations": annotations}, root / "annotations.json")
    return {"images": len(images), "ops": ops, "boxes_in": len(coco["annotations"]),
            "boxes_out": len(annotations), "boxes_dropped": len(coco["annotations"]) - len(annotations),
            "out_dir": str(out_dir)}


def _ratio_of(area_ratios: dict, image_id: int) -> float:
    """r(I) for an image; keys may be ints or their strings (as after a JSON round trip)."""
    if image_id in area_ratios:
        return float(area_ratios[image_id])
    return float(area_ratios.get(str(image_id), 0.0))


def _noise_or_copy(rng: np.random.Generator, source: Path, target: Path, noise_prob: float,
                   noise_sigma: float) -> str:
    """Noise the image with probability ``noise_prob``, else copy it; return the op name."""
    if rng.random() < noise_prob:
        save_png(add_gaussian_noise(rng, _load_rgb(source), noise_sigma), target)
        return "noise"
    if source.suffix.lower() == ".png":
        shutil.copyfile(source, target)  # byte-identical: "unchanged" means unchanged
    else:
        save_png(_load_rgb(source), target)  # lossless re-encode to the output's PNG name
    return "none"


def _crop_image(rng: np.random.Generator, source: Path, target: Path, new_img: dict, anns: list[dict],
                crop_min: float, crop_max: float, min_box_area: float, min_visible: float) -> list[dict]:
    """Crop the image at ``source`` into ``target``, update ``new_img``'s size, return cropped annotations."""
    pixels = _load_rgb(source)
    height, width = pixels.shape[:2]
    if (width, height) != (new_img["width"], new_img["height"]):
        raise DatasetError(f"{source}: image is {width}x{height} but its annotation entry says "
                           f"{new_img['width']}x{new_img['height']}")
    x0, y0, w, h = random_crop_window(rng, width, height, crop_min, crop_max)
    save_png(np.ascontiguousarray(pixels[y0 : y0 + h, x0 : x0 + w]), target)
    new_img["width"], new_img["height"] = w, h
    kept, keep_index = crop_boxes([ann["bbox"] for ann in anns], x0, y0, w, h, min_box_area, min_visible)
    new_anns = []
    for box, index in zip(kept, keep_index):
        ann = {key: value for key, value in anns[index].items() if key != "segmentation"}
        ann["bbox"] = rounded_box(*(float(v) for v in box), w, h)
        if ann["bbox"][2] <= 0 or ann["bbox"][3] <= 0:
            continue  # a sliver that rounds away to nothing
        ann["area"] = round(ann["bbox"][2] * ann["bbox"][3], 2)
        new_anns.append(ann)
    return new_anns


__all__ = ["ME_OPS", "DatasetError", "add_gaussian_noise", "area_ratio", "augment_dataset", "crop_boxes",
           "random_crop_window"]
