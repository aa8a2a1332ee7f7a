"""One synthetic image: textured shapes on a cluttered background, and their boxes.

Images come in two size modes, so that masking enhancement sees both sides of its threshold on
r(I) = sum of box areas / image area: ``"small"`` (many small objects, r(I) <= 0.35) and
``"large"`` (one to a few large objects, maybe a couple of small ones on top, r(I) >= 0.6).
Every draw comes from the numpy ``Generator`` passed in (:mod:`dfmsd.data.synthetic` seeds it).
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass

import cv2
import numpy as np

from dfmsd.data.coco import area_ratio

CLASS_NAMES = ('circle', 'square', 'triangle', 'star', 'ring')
CATEGORIES = [{'id': i + 1, 'name': name, 'supercategory': 'shape'} for i, name in enumerate(CLASS_NAMES)]

# Each size mode keeps a margin from the ME threshold's usual value (0.5), because ME
# measures r(I) from (imperfect) teacher boxes.
SMALL_MODE_MAX_RATIO = 0.35
LARGE_MODE_MIN_RATIO = 0.6

MIN_OBJECT_SIDE = 4.0  # pixels; smallest object drawn
MIN_BOX_SIDE = 2.0  # pixels; clipped boxes thinner than this are not annotated
MAX_OCCLUDED_FRACTION = 0.7  # objects hidden more than this are not annotated
MAX_ATTEMPTS_PER_IMAGE = 25  # re-draws allowed to hit the size-mode's r(I) range

_SUBPIXEL_BITS = 4  # cv2 polygon coordinates are fixed point with this many bits
_TEXTURES = ('solid', 'stripes', 'checker', 'noise')
_TEXTURE_PROBS = (0.4, 0.2, 0.2, 0.2)


# --------------------------------------------------------------------- background


def _random_colour(rng: np.random.Generator, saturation: tuple, value: tuple) -> np.ndarray:
    """An RGB colour (0-255 floats) with random hue and saturation/value in the given ranges."""
    rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(*saturation), rng.uniform(*value))
    return np.array(rgb, dtype=np.float32) * 255.0


def _gradient_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A muted two-colour linear gradient in a random direction, plus low-frequency noise."""
    start = _random_colour(rng, (0.0, 0.45), (0.25, 0.8))
    end = _random_colour(rng, (0.0, 0.45), (0.25, 0.8))
    angle = rng.uniform(0, 2 * np.pi)
    coords = np.arange(size, dtype=np.float32) / max(size - 1, 1)
    t = np.cos(angle) * coords[None, :] + np.sin(angle) * coords[:, None]
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    image = start + (end - start) * t[..., None]
    # Blotchy low-frequency noise: a coarse random grid upsampled smoothly.
    grid = rng.normal(0.0, 18.0, size=(5, 5, 3)).astype(np.float32)
    image += cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)
    return image


def _add_blobs(rng: np.random.Generator, image: np.ndarray) -> None:
    """Blend a few soft Gaussian blobs (clutter with no shape) into ``image`` in place."""
    size = image.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(rng.integers(2, 6)):
        cx, cy = rng.uniform(0, size, 2)
        sx, sy = rng.uniform(0.04, 0.2, 2) * size
        alpha = rng.uniform(0.25, 0.6) * np.exp(-0.5 * (((xx - cx) / sx) ** 2 + ((yy - cy) / sy) ** 2))
        colour = _random_colour(rng, (0.0, 0.6), (0.2, 0.9))
        image += (colour - image) * alpha[..., None]


def _add_lines(rng: np.random.Generator, image: np.ndarray) -> None:
    """Blend a few thin anti-aliased lines (clutter with object-like colours) into ``image``."""
    size = image.shape[0]
    for _ in range(rng.integers(1, 5)):
        mask = np.zeros((size, size), np.uint8)
        p0 = tuple(int(v) for v in rng.integers(0, size, 2))
        p1 = tuple(int(v) for v in rng.integers(0, size, 2))
        cv2.line(mask, p0, p1, 255, thickness=int(rng.integers(1, 3)), lineType=cv2.LINE_AA)
        alpha = mask.astype(np.float32) / 255.0 * rng.uniform(0.4, 0.8)
        colour = _random_colour(rng, (0.0, 1.0), (0.2, 1.0))
        image += (colour - image) * alpha[..., None]


def _cluttered_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A float32 RGB background: gradient, blotches, blobs, lines and pixel noise."""
    image = _gradient_background(rng, size)
    _add_blobs(rng, image)
    _add_lines(rng, image)
    image += rng.normal(0.0, 5.0, size=image.shape).astype(np.float32)
    return image


# ------------------------------------------------------------------------ objects


@dataclass
class _Object:
    """One object to draw: its class and its full (unclipped) box."""

    category_id: int
    x0: float
    y0: float
    w: float
    h: float

    def clipped_box(self, size: int) -> tuple[float, float, float, float]:
        """The box clipped to the image, as (x, y, w, h)."""
        x0, y0 = max(self.x0, 0.0), max(self.y0, 0.0)
        x1, y1 = min(self.x0 + self.w, float(size)), min(self.y0 + self.h, float(size))
        return x0, y0, max(x1 - x0, 0.0), max(y1 - y0, 0.0)


def _aspect_sides(rng: np.random.Generator, area: float) -> tuple[float, float]:
    """Width and height with the given area and a mild random aspect ratio."""
    aspect = math.exp(rng.uniform(math.log(0.75), math.log(1.33)))
    return math.sqrt(area * aspect), math.sqrt(area / aspect)


def _sample_small_objects(rng: np.random.Generator, size: int, count: int) -> list[_Object]:
    """Objects with log-uniform side from 4 px to a quarter of the image; some cut by the edge."""
    max_side = max(MIN_OBJECT_SIDE * 1.5, 0.25 * size)
    objects = []
    for _ in range(count):
        side = math.exp(rng.uniform(math.log(MIN_OBJECT_SIDE), math.log(max_side)))
        w, h = (max(s, MIN_OBJECT_SIDE) for s in _aspect_sides(rng, side * side))
        if rng.random() < 0.15:  # let the image edge cut up to half of the object
            x0, y0 = rng.uniform(-w / 2, size - w / 2), rng.uniform(-h / 2, size - h / 2)
        else:
            x0, y0 = rng.uniform(0, size - w), rng.uniform(0, size - h)
        objects.append(_Object(int(rng.integers(1, len(CLASS_NAMES) + 1)), x0, y0, w, h))
    return objects


def _sample_large_objects(rng: np.random.Generator, size: int, count: int) -> list[_Object]:
    """Objects fully inside the image whose box areas sum to 65-100% of the image."""
    target_ratio = rng.uniform(0.65, 1.0)
    shares = rng.dirichlet([4.0] * count) * target_ratio
    objects = []
    for share in shares:
        w, h = (min(s, 0.98 * size) for s in _aspect_sides(rng, share * size * size))
        x0, y0 = rng.uniform(0, size - w), rng.uniform(0, size - h)
        objects.append(_Object(int(rng.integers(1, len(CLASS_NAMES) + 1)), x0, y0, w, h))
    return objects


def _sample_objects(rng: np.random.Generator, size: int, size_mode: str, max_objects: int) -> list[_Object]:
    """Objects for one image, in drawing order (later ones are drawn on top)."""
    if size_mode == 'small':
        count = int(rng.integers(max(1, math.ceil(max_objects / 2)), max_objects + 1))
        return _sample_small_objects(rng, size, count)
    num_large = int(rng.integers(1, min(3, max_objects) + 1))
    num_small = int(rng.integers(0, min(2, max_objects - num_large) + 1))
    # Small ones go on top so they occlude the large ones, not the other way round.
    return _sample_large_objects(rng, size, num_large) + _sample_small_objects(rng, size, num_small)


def _regular_polygon(num_points: int, start_angle: float, radius: float = 1.0) -> np.ndarray:
    angles = start_angle + np.arange(num_points) * (2 * np.pi / num_points)
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _shape_outlines(rng: np.random.Generator, class_name: str) -> list[tuple[np.ndarray, int]]:
    """Unit-scale outlines of a shape as (points, fill) pairs; fill 0 cuts a hole."""
    if class_name == 'circle':
        return [(_regular_polygon(48, 0.0), 1)]
    if class_name == 'ring':
        inner = rng.uniform(0.45, 0.62)
        return [(_regular_polygon(48, 0.0), 1), (_regular_polygon(48, 0.0, inner), 0)]
    if class_name == 'square':
        return [(_regular_polygon(4, np.pi / 4 + rng.uniform(-0.26, 0.26)), 1)]
    if class_name == 'triangle':
        return [(_regular_polygon(3, rng.uniform(0, 2 * np.pi)), 1)]
    if class_name == 'star':
        outer = _regular_polygon(5, rng.uniform(0, 2 * np.pi))
        inner_radius = rng.uniform(0.38, 0.5)
        start = math.atan2(outer[0, 1], outer[0, 0]) + np.pi / 5
        inner = _regular_polygon(5, start, inner_radius)
        return [(np.stack([outer, inner], axis=1).reshape(10, 2), 1)]
    raise ValueError(f'unknown shape class {class_name!r}')


def _rasterise(outlines, obj: _Object, size: int):
    """Anti-aliased coverage of the object inside the image.

    The outlines are stretched so that their bounding box is exactly the object's
    box. Returns ``(rows, cols, alpha)`` where ``alpha`` (float32 in [0, 1]) covers
    ``image[rows, cols]``, or ``None`` when the object falls outside the image.
    """
    ix0, iy0 = max(int(math.floor(obj.x0)), 0), max(int(math.floor(obj.y0)), 0)
    ix1, iy1 = min(int(math.ceil(obj.x0 + obj.w)), size), min(int(math.ceil(obj.y0 + obj.h)), size)
    if ix1 <= ix0 or iy1 <= iy0:
        return None
    outer = outlines[0][0]
    lo, span = outer.min(axis=0), np.maximum(outer.max(axis=0) - outer.min(axis=0), 1e-9)
    scale, offset = np.array([obj.w, obj.h]) / span, np.array([obj.x0 - ix0, obj.y0 - iy0])
    mask = np.zeros((iy1 - iy0, ix1 - ix0), np.uint8)
    for points, fill in outlines:
        local = ((points - lo) * scale + offset) * (1 << _SUBPIXEL_BITS)
        cv2.fillPoly(mask, [np.round(local).astype(np.int32)], 255 * fill, cv2.LINE_AA, _SUBPIXEL_BITS)
    return slice(iy0, iy1), slice(ix0, ix1), mask.astype(np.float32) / 255.0


def _object_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A saturated colour that stands out from the mean colour of ``background``."""
    mean = background.reshape(-1, 3).mean(axis=0)
    best, best_distance = None, -1.0
    for _ in range(12):
        colour = _random_colour(rng, (0.55, 1.0), (0.5, 1.0))
        distance = float(np.linalg.norm(colour - mean))
        if distance > best_distance:
            best, best_distance = colour, distance
        if distance >= 110.0:
            break
    return best


def _texture(rng: np.random.Generator, shape: tuple[int, int], colour: np.ndarray) -> np.ndarray:
    """Fill pattern for an object: solid, stripes, checker or noisy, in shades of ``colour``."""
    kind = _TEXTURES[rng.choice(len(_TEXTURES), p=_TEXTURE_PROBS)]
    fill = np.broadcast_to(colour, shape + (3,)).astype(np.float32)
    if kind == 'solid':
        return fill
    if kind == 'noise':
        return fill + rng.normal(0.0, 28.0, size=fill.shape).astype(np.float32)
    shade = colour * rng.uniform(0.35, 0.6)  # same hue, darker: the object keeps its colour
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    if kind == 'stripes':
        angle, period = rng.uniform(0, np.pi), rng.uniform(3.0, 8.0)
        pattern = np.floor((xx * np.cos(angle) + yy * np.sin(angle)) / (period / 2)) % 2
    else:  # checker
        cell = rng.uniform(2.0, 6.0)
        pattern = (np.floor(xx / cell) + np.floor(yy / cell)) % 2
    return np.where(pattern[..., None] > 0, shade, fill).astype(np.float32)


def _draw_objects(rng: np.random.Generator, image: np.ndarray, objects: list[_Object]) -> list[_Object]:
    """Draw ``objects`` in order onto ``image`` (in place); return those visible enough.

    An ownership map records which object is on top at each pixel; an object is kept
    when at least ``1 - MAX_OCCLUDED_FRACTION`` of its in-image pixels stay its own.
    """
    size = image.shape[0]
    owner = np.full((size, size), -1, np.int32)
    own_pixels = np.zeros(len(objects), np.int64)
    for index, obj in enumerate(objects):
        outlines = _shape_outlines(rng, CLASS_NAMES[obj.category_id - 1])
        raster = _rasterise(outlines, obj, size)
        if raster is None:
            continue
        rows, cols, alpha = raster
        colour = _object_colour(rng, image[rows, cols])
        texture = _texture(rng, alpha.shape, colour)
        image[rows, cols] += (texture - image[rows, cols]) * alpha[..., None]
        covered = alpha >= 0.5
        owner[rows, cols][covered] = index
        own_pixels[index] = int(covered.sum())
    visible = np.bincount(owner[owner >= 0], minlength=len(objects))
    kept = []
    for index, obj in enumerate(objects):
        _, _, w, h = obj.clipped_box(size)
        if own_pixels[index] == 0 or min(w, h) < MIN_BOX_SIDE:
            continue
        if visible[index] / own_pixels[index] >= 1.0 - MAX_OCCLUDED_FRACTION:
            kept.append(obj)
    return kept


def _ratio_fits_mode(ratio: float, size_mode: str) -> bool:
    if size_mode == 'small':
        return ratio <= SMALL_MODE_MAX_RATIO
    return ratio >= LARGE_MODE_MIN_RATIO


def render_image(rng: np.random.Generator, size: int, size_mode: str, max_objects: int):
    """Draw one image of the given size mode.

    Re-draws (up to ``MAX_ATTEMPTS_PER_IMAGE`` times) until at least one object is
    annotated and r(I) from the annotated boxes lies in the mode's range; occlusion
    can otherwise drop a large object and flip the image's kind. Returns
    ``(uint8 RGB image, [(category_id, (x, y, w, h)), ...])``.
    """
    for _ in range(MAX_ATTEMPTS_PER_IMAGE):
        image = _cluttered_background(rng, size)
        kept = _draw_objects(rng, image, _sample_objects(rng, size, size_mode, max_objects))
        boxes = [obj.clipped_box(size) for obj in kept]
        if kept and _ratio_fits_mode(area_ratio(boxes, size, size), size_mode):
            break
    image += rng.normal(0.0, 3.0, size=image.shape).astype(np.float32)  # sensor-like grain
    pixels = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return pixels, [(obj.category_id, box) for obj, box in zip(kept, boxes)]
