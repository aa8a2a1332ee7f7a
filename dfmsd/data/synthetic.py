"""Deterministic synthetic COCO-format detection dataset of textured shapes.

Each image shows a few shapes (circle, square, triangle, star, ring) on a cluttered
background (gradients, low-frequency noise, soft blobs and lines that are not
objects), drawn by :mod:`dfmsd.data.shapes` in one of two size modes ("small": r(I) <= 0.35;
"large": r(I) >= 0.6), so that masking enhancement sees both sides of its threshold.

Everything is drawn from numpy ``Generator`` objects seeded from ``(seed, split,
image index)``, and PNGs are written by PIL without timestamps, so the same seed
gives byte-identical files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dfmsd.core.io import Progress, atomic_directory, write_json
from dfmsd.data.coco import area_ratio, rounded_box, save_png
from dfmsd.data.shapes import CATEGORIES, render_image


def _size_modes(rng: np.random.Generator, count: int, small_fraction: float) -> list[str]:
    """Exactly round(fraction * count) "small" images, at random positions."""
    num_small = int(round(small_fraction * count))
    modes = np.array(['small'] * num_small + ['large'] * (count - num_small))
    return [str(mode) for mode in rng.permutation(modes)]


def _generate_split(
    image_dir: Path,
    split: str,
    split_index: int,
    count: int,
    *,
    image_size: int,
    seed: int,
    small_image_fraction: float,
    max_objects: int,
    progress: bool,
) -> dict:
    """Write one split's PNGs under ``image_dir`` and return its COCO dict."""
    image_dir.mkdir(parents=True)
    modes = _size_modes(np.random.default_rng([seed, split_index, 0]), count, small_image_fraction)
    images, annotations = [], []
    reporter = Progress(count, f'generate {split}', enabled=progress)
    for index, size_mode in enumerate(modes):
        # One generator per image: image i does not depend on how many come before it.
        rng = np.random.default_rng([seed, split_index, 1, index])
        pixels, objects = render_image(rng, image_size, size_mode, max_objects)
        image_id = index + 1
        file_name = f'{image_id:06d}.png'
        save_png(pixels, image_dir / file_name)
        images.append(
            {'id': image_id, 'file_name': file_name, 'width': image_size, 'height': image_size, 'size_mode': size_mode}
        )
        for category_id, (x, y, w, h) in objects:
            bbox = rounded_box(x, y, w, h, image_size, image_size)
            annotations.append(
                {
                    'id': len(annotations) + 1,
                    'image_id': image_id,
                    'category_id': category_id,
                    'bbox': bbox,
                    'area': round(bbox[2] * bbox[3], 2),
                    'iscrowd': 0,
                }
            )
        reporter.update()
    info = {'description': f'DFMSD synthetic shapes ({split})', 'seed': seed, 'image_size': image_size}
    return {'info': info, 'images': images, 'annotations': annotations, 'categories': CATEGORIES}


def summarise_coco(coco: dict, threshold: float = 0.5) -> dict:
    """Counts of a COCO dict: images, boxes, boxes per class, images on each side of r(I) = threshold."""
    names = {c['id']: c['name'] for c in coco['categories']}
    per_class = {name: 0 for name in names.values()}
    boxes_by_image: dict[int, list] = {img['id']: [] for img in coco['images']}
    for ann in coco['annotations']:
        per_class[names[ann['category_id']]] += 1
        boxes_by_image[ann['image_id']].append(ann['bbox'])
    ratios = [area_ratio(boxes_by_image[img['id']], img['width'], img['height']) for img in coco['images']]
    small = sum(r < threshold for r in ratios)
    return {
        'images': len(coco['images']),
        'annotations': len(coco['annotations']),
        'per_class': per_class,
        'small_dominated': small,
        'large_dominated': len(ratios) - small,
    }


#: Generation order of the splits: a split's images depend on its index only, so adding a
#: split after the others leaves their bytes unchanged.
SPLIT_INDEX = {'train': 0, 'val': 1, 'test': 2}


def generate_dataset(
    out_dir,
    splits: dict[str, tuple[str, str, int]],
    *,
    image_size: int = 128,
    seed: int = 0,
    small_image_fraction: float = 0.5,
    max_objects: int = 6,
    progress: bool = True,
) -> dict:
    """Generate the synthetic dataset under ``out_dir`` (replacing it atomically).

    ``splits`` maps a split name (train, val, test) to ``(annotation file, image dir,
    image count)``, paths relative to ``out_dir``. Image entries carry an extra
    ``"size_mode"`` ("small" or "large"); exactly ``round(small_image_fraction * n)``
    images of each split are "small", at random positions. Boxes are the full object's
    box clipped to the image; ``area`` is the box area. ``max_objects`` caps the objects
    drawn per image (occluded ones may then be dropped from the annotations).

    Returns ``{split: summary}`` (see :func:`summarise_coco`).
    """
    if image_size < 32 or seed < 0 or max_objects < 1 or not 0.0 <= small_image_fraction <= 1.0:
        raise ValueError(
            f'invalid generation arguments: image_size={image_size}, seed={seed}, '
            f'max_objects={max_objects}, small_image_fraction={small_image_fraction}'
        )
    summary: dict = {}
    with atomic_directory(out_dir) as root:
        for split, (ann, img, count) in splits.items():
            coco = _generate_split(
                root / img,
                split,
                SPLIT_INDEX[split],
                count,
                image_size=image_size,
                seed=seed,
                small_image_fraction=small_image_fraction,
                max_objects=max_objects,
                progress=progress,
            )
            write_json(root / ann, coco, indent=None)
            summary[split] = summarise_coco(coco)
    return summary


def generate_from_params(data, root: str | None = None) -> dict:
    """The dataset that params ``data`` (a ``dfmsd.core.params.Data``) describes, under
    ``root`` (default ``data.root``): what the ``data`` stage generates."""
    return generate_dataset(
        root or data.root,
        {name: (s.ann, s.img, s.images) for name, s in data.splits.items()},
        image_size=data.image_size,
        seed=data.seed,
        small_image_fraction=data.synthetic.small_image_fraction,
        max_objects=data.synthetic.max_objects,
    )
