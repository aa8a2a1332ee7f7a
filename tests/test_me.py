"""Masking enhancement (dfmsd.data.me): per-image decisions, the enhanced views, the offline
reference views."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from dfmsd.core.io import write_json
from dfmsd.core.params import ME
from dfmsd.data.coco import ground_truth_ratios, load_rgb
from dfmsd.data.me import decide, decision_table, enhance, load_table, write_views

T = 0.5
CROP = {'crop_min': 0.1, 'crop_max': 0.3}


def ratios_around(threshold: float, count: int, seed: int = 0) -> dict[int, float]:
    """``count`` image ids with r(I) spread on both sides of ``threshold``."""
    values = np.random.default_rng(seed).uniform(0, 2 * threshold, count)
    return {image_id: float(r) for image_id, r in zip(range(1, count + 1), values)}


def positions(height: int, width: int) -> np.ndarray:
    """An RGB image whose red channel is the column and green the row of each pixel."""
    rows, cols = np.mgrid[0:height, 0:width]
    return np.stack([cols, rows, (rows + cols) % 256], axis=-1).astype(np.uint8)


def view(image, op, image_id=1, seed=0, sigma=25.0, **crop):
    return enhance(image, op, image_id=image_id, seed=seed, noise_sigma=sigma, **(CROP | crop))


# ---------------------------------------------------------------- decide


@pytest.mark.fast
def test_threshold_splits_crop_from_noise_or_nothing():
    ratios = {1: 0.0, 2: T - 1e-9, 3: T, 4: T + 1e-9, 5: 3.0} | ratios_around(T, 300, seed=1)
    ratios = {i: r for i, r in enumerate(ratios.values(), start=1)}
    ops = decide(ratios, threshold=T, noise_prob=0.5, seed=0)
    assert ops.keys() == ratios.keys()
    for image_id, op in ops.items():
        assert op == 'crop' if ratios[image_id] >= T else op in ('noise', 'none'), (image_id, ratios[image_id])
    below = [ops[i] for i, r in ratios.items() if r < T]
    assert {'noise', 'none'} <= set(below)


@pytest.mark.fast
@pytest.mark.parametrize('noise_prob', [0.2, 0.7])
def test_noise_share_follows_its_probability(noise_prob):
    ratios = dict.fromkeys(range(1, 2001), 0.1)
    ops = decide(ratios, threshold=T, noise_prob=noise_prob, seed=3)
    share = Counter(ops.values())['noise'] / len(ops)
    assert abs(share - noise_prob) < 0.04  # the binomial std is about 0.01


@pytest.mark.fast
def test_probability_edges():
    ratios = ratios_around(T, 200)
    never = decide(ratios, threshold=T, noise_prob=0.0, seed=0)
    always = decide(ratios, threshold=T, noise_prob=1.0, seed=0)
    for image_id, r in ratios.items():
        assert never[image_id] == ('crop' if r >= T else 'none')
        assert always[image_id] == ('crop' if r >= T else 'noise')


@pytest.mark.fast
def test_draws_depend_on_seed_and_image_id_only():
    ratios = ratios_around(T, 300)
    ops = decide(ratios, threshold=T, noise_prob=0.5, seed=7)
    shuffled = dict(sorted(ratios.items(), key=lambda kv: -kv[0]))
    assert decide(shuffled, threshold=T, noise_prob=0.5, seed=7) == ops
    subset = {i: r for i, r in ratios.items() if i % 3 == 0}
    assert decide(subset, threshold=T, noise_prob=0.5, seed=7) == {i: ops[i] for i in subset}
    # another image's r(I) changes nothing for the others
    changed = dict(ratios)
    changed[1] = 2 * T
    again = decide(changed, threshold=T, noise_prob=0.5, seed=7)
    assert again[1] == 'crop'
    assert {i: op for i, op in again.items() if i != 1} == {i: op for i, op in ops.items() if i != 1}


@pytest.mark.fast
def test_another_seed_changes_the_draws():
    ratios = dict.fromkeys(range(1, 201), 0.1)
    first = decide(ratios, threshold=T, noise_prob=0.5, seed=0)
    second = decide(ratios, threshold=T, noise_prob=0.5, seed=1)
    assert sum(first[i] != second[i] for i in ratios) > 50


@pytest.mark.fast
def test_decision_table_counts_and_settings():
    ratios = ratios_around(T, 120)
    table = decision_table(ratios, ME(threshold=T, noise_prob=0.5, noise_sigma=20.0, **CROP), seed=4)
    ops = decide(ratios, threshold=T, noise_prob=0.5, seed=4)
    assert table['ops'] == {str(i): op for i, op in ops.items()}
    assert table['counts'] == {
        'noise': list(ops.values()).count('noise'),
        'crop': list(ops.values()).count('crop'),
        'none': list(ops.values()).count('none'),
    }
    assert sum(table['counts'].values()) == len(ratios)
    assert table['counts']['crop'] == sum(r >= T for r in ratios.values())
    assert (table['seed'], table['noise_sigma'], table['crop_min'], table['crop_max']) == (4, 20.0, 0.1, 0.3)


@pytest.mark.fast
def test_decision_table_lists_every_op_even_when_unused(tmp_path):
    table = decision_table({1: 0.9, 2: 2.0}, ME(threshold=T, noise_prob=0.5, noise_sigma=20.0, **CROP), seed=0)
    assert table['counts'] == {'noise': 0, 'crop': 2, 'none': 0}
    write_json(tmp_path / 't.json', table)
    ops, settings = load_table(tmp_path / 't.json')
    assert ops == {1: 'crop', 2: 'crop'} and settings['threshold'] == T


# ---------------------------------------------------------------- enhance: noise


@pytest.mark.fast
def test_noise_has_zero_mean_and_sigma_std_on_a_large_image():
    grey = np.full((256, 256, 3), 128, np.uint8)
    for sigma in (10.0, 25.0):
        noisy = view(grey, 'noise', sigma=sigma)
        assert noisy.dtype == np.uint8 and noisy.shape == grey.shape
        added = noisy.astype(np.float64) - 128
        assert abs(added.mean()) < 0.2
        assert added.std() == pytest.approx(sigma, rel=0.02)
    assert (grey == 128).all()  # the input is kept


@pytest.mark.fast
def test_noise_is_clipped_not_wrapped():
    black = view(np.zeros((128, 128, 3), np.uint8), 'noise', sigma=25.0)
    white = view(np.full((128, 128, 3), 255, np.uint8), 'noise', sigma=25.0)
    assert black.max() < 128 and white.min() > 127  # a wrap-around would land near the other end
    assert (black == 0).mean() == pytest.approx(0.5, abs=0.03)  # every negative draw
    assert (white == 255).mean() == pytest.approx(0.5, abs=0.03)


@pytest.mark.fast
def test_noise_is_deterministic_per_seed_and_image_id():
    image = positions(64, 48)
    same = view(image, 'noise', image_id=3, seed=2)
    assert np.array_equal(same, view(image, 'noise', image_id=3, seed=2))
    assert not np.array_equal(same, view(image, 'noise', image_id=4, seed=2))
    assert not np.array_equal(same, view(image, 'noise', image_id=3, seed=5))


# ---------------------------------------------------------------- enhance: crop


@pytest.mark.fast
def test_crop_keeps_a_share_of_each_side_in_range_and_splits_the_cut_between_edges():
    height, width = 150, 200
    image = positions(height, width)
    before_share = []
    for image_id in range(1, 201):
        out = view(image, 'crop', image_id=image_id)
        h, w = out.shape[:2]
        for kept, side in ((w, width), (h, height)):
            half_pixel = 0.5 / side  # the cut is a whole number of pixels
            assert 1 - CROP['crop_max'] - half_pixel <= kept / side <= 1 - CROP['crop_min'] + half_pixel
        x0, y0 = int(out[0, 0, 0]), int(out[0, 0, 1])
        # a contiguous window: columns x0.., rows y0.., nothing resampled
        assert np.array_equal(out, image[y0 : y0 + h, x0 : x0 + w])
        before_share.append(x0 / (width - w))
    assert 0.35 < np.mean(before_share) < 0.65
    assert min(before_share) < 0.15 and max(before_share) > 0.85


@pytest.mark.fast
@pytest.mark.parametrize('height, width', [(1, 1), (2, 3), (5, 1)])
def test_crop_keeps_at_least_one_pixel_per_side(height, width):
    image = positions(height, width)
    for image_id in range(1, 20):
        out = view(image, 'crop', image_id=image_id, crop_min=0.999, crop_max=0.999)
        assert out.shape[:2] == (1, 1)
        y, x = int(out[0, 0, 1]), int(out[0, 0, 0])
        assert np.array_equal(out, image[y : y + 1, x : x + 1])


def window(out: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, w, h) of a crop of :func:`positions`."""
    return int(out[0, 0, 0]), int(out[0, 0, 1]), out.shape[1], out.shape[0]


@pytest.mark.fast
def test_crop_is_deterministic_per_seed_and_image_id():
    image = positions(120, 120)
    windows = {
        (seed, image_id): window(view(image, 'crop', image_id=image_id, seed=seed))
        for seed in (0, 1)
        for image_id in range(1, 30)
    }
    for (seed, image_id), first in windows.items():
        assert window(view(image, 'crop', image_id=image_id, seed=seed)) == first
    assert len(set(windows.values())) > 20  # and they differ between images and seeds


@pytest.mark.fast
@pytest.mark.parametrize('op', ['none', 'blur'])
def test_enhance_refuses_ops_without_a_view(op):
    with pytest.raises(ValueError, match=op):
        view(positions(8, 8), op)


# ---------------------------------------------------------------- write_views


@pytest.fixture
def train_views(tiny_dataset, tmp_path):
    """(coco, image dir, table file, ops) for the tiny dataset's train split, r(I) from its boxes."""
    coco = json.loads((tiny_dataset / 'annotations/instances_train.json').read_text())
    table = decision_table(ground_truth_ratios(coco), ME(threshold=T, noise_prob=0.5, noise_sigma=25.0, **CROP), seed=2)
    write_json(tmp_path / 'seed2.json', table)
    ops, _ = load_table(tmp_path / 'seed2.json')
    assert set(ops.values()) == {'noise', 'crop', 'none'}  # the split exercises every op
    return coco, tiny_dataset / 'train', tmp_path / 'seed2.json', ops


@pytest.mark.fast
def test_one_png_per_image_with_a_view_equal_to_enhance(train_views, tmp_path):
    coco, img_dir, table, ops = train_views
    written = write_views(coco, img_dir, table, tmp_path / 'views')
    with_view = {i for i, op in ops.items() if op != 'none'}
    assert set(written) == with_view
    assert sorted(p.name for p in (tmp_path / 'views').glob('*.png')) == sorted(f'{i}.png' for i in with_view)
    for img in coco['images']:
        if ops[img['id']] == 'none':
            continue
        expected = view(load_rgb(img_dir / img['file_name']), ops[img['id']], image_id=img['id'], seed=2)
        assert np.array_equal(load_rgb(written[img['id']]), expected)
    assert json.loads((tmp_path / 'views/ops.json').read_text()) == {str(i): op for i, op in ops.items()}


@pytest.mark.fast
def test_views_are_byte_identical_on_a_rerun(train_views, tmp_path):
    coco, img_dir, table, _ = train_views
    first = write_views(coco, img_dir, table, tmp_path / 'a')
    second = write_views(coco, img_dir, table, tmp_path / 'b')
    assert {i: p.read_bytes() for i, p in first.items()} == {i: p.read_bytes() for i, p in second.items()}


@pytest.mark.fast
def test_a_failure_midway_keeps_the_previous_views(train_views, tmp_path):
    coco, img_dir, table, ops = train_views
    out = tmp_path / 'out' / 'views'
    write_views(coco, img_dir, table, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    last_with_view = [img for img in coco['images'] if ops[img['id']] != 'none'][-1]
    (img_dir / last_with_view['file_name']).unlink()
    with pytest.raises(FileNotFoundError):
        write_views(coco, img_dir, table, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in out.parent.iterdir()) == ['views']  # no temporary directory left
