"""COCO-format datasets: where a split's files are, what a valid one is, box arithmetic.

:func:`validate_coco` is the check every dataset passes before a training stage sees it
(a generated one and a user's own alike): the message of each :class:`DatasetError`
names the file and the entry at fault.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from dfmsd.core.errors import DatasetError
from dfmsd.core.io import sha256_file

#: Boxes may stick out of the image by this many pixels (rounding of annotation tools).
BOX_TOLERANCE = 1.0


def split_files(data: Any, split: str) -> tuple[Path, Path]:
    """(annotation file, image directory) of ``split`` under ``data.root``; ``data`` is a
    validated ``params.Data`` or its dict."""
    get = data.get if isinstance(data, dict) else lambda k: getattr(data, k)
    spec = get('splits')[split]
    ann, img = (spec['ann'], spec['img']) if isinstance(spec, dict) else (spec.ann, spec.img)
    return Path(get('root')) / ann, Path(get('root')) / img


def split_manifest(ann_file: str | Path, img_dir: str | Path, coco: dict) -> dict[str, Any]:
    """One split's identity by content: the annotation file's sha256 and one sha256 over its
    images (names and bytes, in file-name order). The stages that read a dataset depend on the manifest
    of these (stage `data`), not on the dataset directory: DVC then hashes one small file per
    stage instead of walking every image (1.4k here, 118k for COCO) once per stage, and the
    `data` stage, whose output is the whole root, rewrites the manifest after any edit there."""
    images = hashlib.sha256()
    for name in sorted(img['file_name'] for img in coco['images']):
        images.update(f'{name}\0{sha256_file(Path(img_dir) / name)}\n'.encode())
    return {'ann_sha256': sha256_file(ann_file), 'images': len(coco['images']), 'images_sha256': images.hexdigest()}


def dataset_classes(ann_file: str | Path) -> tuple[str, ...]:
    """Class names in category-id order."""
    cats = load_json(ann_file).get('categories') or []
    return tuple(c['name'] for c in sorted(cats, key=lambda c: c['id']))


def save_png(image: np.ndarray, path: str | Path) -> None:
    """Write an RGB uint8 array as PNG; PIL adds no timestamp, so output is reproducible."""
    Image.fromarray(image).save(path, format='PNG', compress_level=6)


def load_rgb(path: str | Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert('RGB'))


def rounded_box(x: float, y: float, w: float, h: float, width: int, height: int) -> list[float]:
    """An (x, y, w, h) box clipped to the image and rounded to 0.01 px for JSON.

    Rounding the corners (not the width) keeps x + w within the image.
    """
    x0, y0 = round(min(max(x, 0.0), width), 2), round(min(max(y, 0.0), height), 2)
    x1, y1 = round(min(max(x + w, 0.0), width), 2), round(min(max(y + h, 0.0), height), 2)
    return [x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)]


def area_ratio(boxes_xywh, width: int, height: int) -> float:
    """r(I): summed area of (x, y, w, h) boxes over the image area (overlaps count twice,
    so it may exceed 1); 0.0 for no boxes."""
    if width <= 0 or height <= 0:
        raise ValueError(f'image size must be positive, got {width}x{height}')
    boxes = np.asarray(boxes_xywh, dtype=np.float64).reshape(-1, 4)
    return float((boxes[:, 2] * boxes[:, 3]).sum() / (width * height))


def ground_truth_ratios(coco: dict) -> dict[int, float]:
    """r(I) of every image of a COCO dict from its annotated boxes."""
    boxes: dict[int, list] = {img['id']: [] for img in coco['images']}
    for ann in coco['annotations']:
        boxes[ann['image_id']].append(ann['bbox'])
    return {img['id']: area_ratio(boxes[img['id']], img['width'], img['height']) for img in coco['images']}


def load_json(ann_file: str | Path) -> dict:
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise DatasetError(f'{ann_file}: annotation file not found')
    try:
        with open(ann_file, encoding='utf-8') as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f'{ann_file}: not valid JSON ({err})') from None
    if not isinstance(data, dict):
        raise DatasetError(f'{ann_file}: top level must be a JSON object, got {type(data).__name__}')
    return data


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def validate_coco(ann_file: str | Path, img_dir: str | Path, *, check_images: bool = True) -> dict:
    """Load a COCO detection annotation file and check it fully against ``img_dir``.

    Checks: valid JSON; ``images``, ``annotations`` and ``categories`` lists; integer ids,
    unique within each list; each image has a file name and positive width/height; each
    annotation names a known image and category and has a finite bbox of positive size
    inside its image (``BOX_TOLERANCE`` px of slack); and, with ``check_images``, every
    image file exists, decodes, and has the size its entry says. Returns the loaded dict.
    """
    ann_file, img_dir = Path(ann_file), Path(img_dir)
    data = load_json(ann_file)
    for key in ('images', 'annotations', 'categories'):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{ann_file}: missing or non-list '{key}'")
    images: dict[Any, dict] = {}
    for img in data['images']:
        if not isinstance(img, dict) or not isinstance(img.get('id'), int):
            raise DatasetError(f'{ann_file}: image entry without an integer id: {str(img)[:80]}')
        if img['id'] in images:
            raise DatasetError(f'{ann_file}: image id {img["id"]} appears twice')
        if not isinstance(img.get('file_name'), str) or not all(
            isinstance(img.get(k), int) and img[k] > 0 for k in ('width', 'height')
        ):
            raise DatasetError(f'{ann_file}: image {img["id"]} needs file_name and positive integer width and height')
        images[img['id']] = img
    categories: set[Any] = set()
    for cat in data['categories']:
        if not isinstance(cat, dict) or not isinstance(cat.get('id'), int):
            raise DatasetError(f'{ann_file}: category entry without an integer id: {str(cat)[:80]}')
        if cat['id'] in categories:
            raise DatasetError(f'{ann_file}: category id {cat["id"]} appears twice')
        categories.add(cat['id'])
    if not categories:
        raise DatasetError(f'{ann_file}: no categories')
    annotation_ids: set[Any] = set()
    for ann in data['annotations']:
        if not isinstance(ann, dict):
            raise DatasetError(f'{ann_file}: annotation entry is not an object: {str(ann)[:80]}')
        if not isinstance(ann.get('id'), int):
            raise DatasetError(f'{ann_file}: annotation entry without an integer id: {str(ann)[:80]}')
        if ann['id'] in annotation_ids:
            raise DatasetError(f'{ann_file}: annotation id {ann["id"]} appears twice')
        annotation_ids.add(ann['id'])
        where = f'{ann_file}: annotation {ann["id"]}'
        img = images.get(ann.get('image_id'))
        if img is None:
            raise DatasetError(f'{where} references unknown image_id {ann.get("image_id")}')
        if ann.get('category_id') not in categories:
            raise DatasetError(f'{where} references unknown category_id {ann.get("category_id")}')
        bbox = ann.get('bbox')
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(_number, bbox)) and bbox[2] > 0 and bbox[3] > 0):
            raise DatasetError(f'{where} has invalid bbox {bbox!r} (want 4 numbers x, y, w, h with w, h > 0)')
        x, y, w, h = bbox
        if (
            x < -BOX_TOLERANCE
            or y < -BOX_TOLERANCE
            or x + w > img['width'] + BOX_TOLERANCE
            or y + h > img['height'] + BOX_TOLERANCE
        ):
            raise DatasetError(
                f'{where}: bbox {bbox} lies outside its image {img["id"]} ({img["width"]}x{img["height"]})'
            )
    if check_images:
        for img in images.values():
            _check_image(ann_file, img_dir / img['file_name'], img)
    return data


def validate_split(split: str, ann_file: str | Path, img_dir: str | Path, *, check_images: bool = True) -> dict:
    """:func:`validate_coco`, and a split the stages can use: at least one image, and for train
    at least one box (a valid but empty file would otherwise pass, and fail only in training)."""
    coco = validate_coco(ann_file, img_dir, check_images=check_images)
    if not coco['images']:
        raise DatasetError(f'{ann_file}: split {split} has no images (it needs at least one)')
    if split == 'train' and not coco['annotations']:
        raise DatasetError(f'{ann_file}: split train has no annotations (no box to learn from)')
    return coco


def _check_image(ann_file: Path, path: Path, entry: dict) -> None:
    where = f'{ann_file}: image {entry["id"]}'
    if not path.is_file():
        raise DatasetError(f'{where} file missing: {path}')
    try:
        with Image.open(path) as im:
            size = im.size
            im.verify()  # decodes the data stream; a truncated or garbage file fails here
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DatasetError(f'{where}: {path} is not a readable image ({err})') from None
    if size != (entry['width'], entry['height']):
        raise DatasetError(
            f'{where}: {path} is {size[0]}x{size[1]} but its entry says {entry["width"]}x{entry["height"]}'
        )
