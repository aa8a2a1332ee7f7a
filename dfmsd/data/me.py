"""Masking enhancement (ME): decided ahead of time per image, applied online per sample.

The weak teacher's boxes give each training image r(I) = summed box area / image area
(``teacher_boxes`` stage). :func:`decide` then fixes, per run seed, what happens to each
image (paper §3.2, method notes §5):

* r(I) < T (small objects): ``noise`` with probability ``noise_prob`` (Gaussian noise
  N(0, sigma^2) on the 0-255 scale, a high-frequency enhancement), else ``none``;
* r(I) >= T (large objects): ``crop`` (a random share in [crop_min, crop_max] of each
  side cut off, split randomly between the two edges; a low-frequency enhancement once
  the view is resized back to the input scale).

The decisions are a small table (``data/me/<pair>/seed<k>.json``), versioned by DVC and
summarised in the report. The enhanced *views* are made in the training data pipeline by
the registered transform ``MaskingEnhancement`` (dfmsd.models.transforms), which calls
:func:`enhance`. Every draw comes from a generator seeded by (seed, image id), so the
same seed and image give the same bytes whatever the worker count or process rank, and
no PNG copy of the dataset is ever written. :func:`write_views` is the offline reference
(PNG files) that the tests compare the online transform with.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from dfmsd.core.io import atomic_directory, read_json, write_json
from dfmsd.data.coco import load_rgb, save_png

OPS = ('noise', 'crop', 'none')
_DECIDE, _PIXELS = 0, 1  # generator streams: the decision, then the view's pixels


def decide(area_ratios: dict[int, float], *, threshold: float, noise_prob: float, seed: int) -> dict[int, str]:
    """image id -> 'noise' | 'crop' | 'none' (see the module docstring)."""
    ops = {}
    for image_id, ratio in sorted(area_ratios.items()):
        if ratio >= threshold:
            ops[image_id] = 'crop'
        else:
            rng = np.random.default_rng([seed, image_id, _DECIDE])
            ops[image_id] = 'noise' if rng.random() < noise_prob else 'none'
    return ops


def decision_table(area_ratios: dict[int, float], settings, *, seed: int) -> dict:
    """The JSON the ``me_table`` stage writes: the settings (params ``me``: threshold, noise_prob,
    noise_sigma, crop_min, crop_max), counts, and one op per image."""
    ops = decide(area_ratios, threshold=settings.threshold, noise_prob=settings.noise_prob, seed=seed)
    counts = Counter(ops.values())
    return {
        'seed': seed,
        **{k: getattr(settings, k) for k in ('threshold', 'noise_prob', 'noise_sigma', 'crop_min', 'crop_max')},
        'counts': {op: counts.get(op, 0) for op in OPS},
        'ops': {str(k): v for k, v in ops.items()},
    }


def load_table(path: str | Path) -> tuple[dict[int, str], dict]:
    """(image id -> op, settings) from a decision table file."""
    table = read_json(path)
    return {int(k): v for k, v in table['ops'].items()}, table


def crop_window(
    rng: np.random.Generator, width: int, height: int, crop_min: float, crop_max: float
) -> tuple[int, int, int, int]:
    """(x0, y0, w, h): a share in [crop_min, crop_max] of each side removed, split randomly
    between its two edges; at least one pixel kept per side."""

    def one_axis(length: int) -> tuple[int, int]:
        removed = min(int(round(rng.uniform(crop_min, crop_max) * length)), length - 1)
        before = int(round(rng.uniform(0, 1) * removed))
        return before, length - removed

    x0, w = one_axis(width)
    y0, h = one_axis(height)
    return x0, y0, w, h


def enhance(
    image_rgb: np.ndarray, op: str, *, image_id: int, seed: int, noise_sigma: float, crop_min: float, crop_max: float
) -> np.ndarray:
    """The enhanced view of an H x W x 3 uint8 RGB image (a new array; the input is kept)."""
    rng = np.random.default_rng([seed, image_id, _PIXELS])
    if op == 'noise':
        noisy = image_rgb.astype(np.float64) + rng.normal(0.0, noise_sigma, size=image_rgb.shape)
        return np.clip(np.round(noisy), 0, 255).astype(np.uint8)
    if op == 'crop':
        height, width = image_rgb.shape[:2]
        x0, y0, w, h = crop_window(rng, width, height, crop_min, crop_max)
        return np.ascontiguousarray(image_rgb[y0 : y0 + h, x0 : x0 + w])
    raise ValueError(f"ME op must be 'noise' or 'crop' to make a view, got {op!r}")


def write_views(coco: dict, img_dir: str | Path, table_file: str | Path, out_dir: str | Path) -> dict[int, Path]:
    """Offline reference: each enhanced view as a PNG in ``out_dir`` (``<image id>.png``).

    Images whose op is 'none' get no view. Used by the tests to check the online transform,
    and handy to look at the views.
    """
    ops, table = load_table(table_file)
    written = {}
    with atomic_directory(out_dir) as tmp:
        for img in coco['images']:
            op = ops.get(img['id'], 'none')
            if op == 'none':
                continue
            view = enhance(
                load_rgb(Path(img_dir) / img['file_name']),
                op,
                image_id=img['id'],
                seed=table['seed'],
                noise_sigma=table['noise_sigma'],
                crop_min=table['crop_min'],
                crop_max=table['crop_max'],
            )
            save_png(view, tmp / f'{img["id"]}.png')
            written[img['id']] = Path(out_dir) / f'{img["id"]}.png'
        write_json(tmp / 'ops.json', {str(k): v for k, v in ops.items()})
    return written
