"""The synthetic dataset generator (dfmsd.data.synthetic) and the COCO checks and box
arithmetic (dfmsd.data.coco)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dfmsd.core.errors import DatasetError
from dfmsd.data import coco as coco_mod
from dfmsd.data import shapes, synthetic
from dfmsd.data.coco import area_ratio, rounded_box, split_files, validate_coco
from dfmsd.data.synthetic import generate_dataset

SIZE = 64


def layout(counts: dict[str, int]) -> dict[str, tuple[str, str, int]]:
    """Non-default paths, so that the test sees the generator honour the ones it is given."""
    return {split: (f'labels/{split}-boxes.json', f'pictures/{split}', n) for split, n in counts.items()}


def digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob('*'))
        if p.is_file()
    }


def generate(out: Path, counts: dict[str, int], **kwargs) -> dict:
    kwargs = {'image_size': SIZE, 'seed': 5, 'progress': False} | kwargs
    return generate_dataset(out, layout(counts), **kwargs)


def boxes_by_image(coco: dict) -> dict[int, list]:
    boxes: dict[int, list] = {img['id']: [] for img in coco['images']}
    for ann in coco['annotations']:
        boxes[ann['image_id']].append(ann['bbox'])
    return boxes


# ---------------------------------------------------------------- generate_dataset


@pytest.mark.fast
def test_three_splits_at_the_given_paths(tmp_path):
    counts = {'train': 4, 'val': 2, 'test': 3}
    summary = generate(tmp_path / 'ds', counts)
    for split, (ann, img, n) in layout(counts).items():
        coco = validate_coco(tmp_path / 'ds' / ann, tmp_path / 'ds' / img)
        assert len(coco['images']) == n == summary[split]['images']
        assert len(coco['annotations']) == summary[split]['annotations'] > 0
        assert sorted(p.name for p in (tmp_path / 'ds' / img).iterdir()) == sorted(
            i['file_name'] for i in coco['images']
        )
    assert sorted(p.name for p in (tmp_path / 'ds').iterdir()) == ['labels', 'pictures']


@pytest.mark.fast
def test_same_seed_gives_the_same_bytes_and_another_seed_other_bytes(tmp_path):
    counts = {'train': 3, 'val': 2, 'test': 2}
    generate(tmp_path / 'a', counts)
    generate(tmp_path / 'b', counts)
    generate(tmp_path / 'c', counts, seed=6)
    first, again, other = digests(tmp_path / 'a'), digests(tmp_path / 'b'), digests(tmp_path / 'c')
    assert len(first) == 3 + 2 + 2 + 3
    assert first == again
    assert first.keys() == other.keys()
    assert all(first[name] != other[name] for name in first)


@pytest.mark.fast
def test_adding_a_split_leaves_the_others_bytes_unchanged(tmp_path):
    generate(tmp_path / 'two', {'train': 3, 'val': 2})
    generate(tmp_path / 'three', {'test': 2, 'val': 2, 'train': 3})  # another order, too
    two, three = digests(tmp_path / 'two'), digests(tmp_path / 'three')
    assert two.items() <= three.items()
    assert any(name.startswith('pictures/test/') for name in three.keys() - two.keys())


@pytest.mark.fast
def test_more_images_leave_the_first_ones_unchanged(tmp_path):
    generate(tmp_path / 'few', {'train': 2})
    generate(tmp_path / 'more', {'train': 4})
    few, more = digests(tmp_path / 'few'), digests(tmp_path / 'more')
    images = {name: digest for name, digest in few.items() if name.endswith('.png')}
    assert len(images) == 2 and images.items() <= more.items()


@pytest.mark.fast
def test_size_modes_keep_their_area_ratio_ranges(tmp_path):
    counts = {'train': 40, 'val': 10, 'test': 10}
    summary = generate(tmp_path / 'ds', counts, small_image_fraction=0.3)
    for split, (ann, _, n) in layout(counts).items():
        coco = json.loads((tmp_path / 'ds' / ann).read_text())
        modes = [img['size_mode'] for img in coco['images']]
        assert modes.count('small') == round(0.3 * n)
        assert modes.count('large') == n - round(0.3 * n)
        boxes = boxes_by_image(coco)
        for img in coco['images']:
            assert boxes[img['id']], f'{split} image {img["id"]} has no box'
            ratio = area_ratio(boxes[img['id']], img['width'], img['height'])
            if img['size_mode'] == 'small':  # 1e-3: boxes are rounded to 0.01 px in the JSON
                assert ratio <= shapes.SMALL_MODE_MAX_RATIO + 1e-3, (split, img)
            else:
                assert ratio >= shapes.LARGE_MODE_MIN_RATIO - 1e-3, (split, img)
        assert summary[split]['small_dominated'] == modes.count('small')
        assert summary[split]['large_dominated'] == modes.count('large')
        assert sum(summary[split]['per_class'].values()) == len(coco['annotations'])


@pytest.mark.fast
def test_small_mode_images_hold_several_small_objects_and_large_mode_ones_big_ones(tmp_path):
    counts = {'train': 30}
    generate(tmp_path / 'ds', counts)
    coco = json.loads((tmp_path / 'ds' / layout(counts)['train'][0]).read_text())
    boxes = boxes_by_image(coco)
    small = [img['id'] for img in coco['images'] if img['size_mode'] == 'small']
    large = [img['id'] for img in coco['images'] if img['size_mode'] == 'large']
    assert np.mean([len(boxes[i]) for i in small]) >= 2
    largest = [max(w * h for _, _, w, h in boxes[i]) / SIZE**2 for i in large]
    assert min(largest) >= 0.1
    assert max(max(w, h) for i in small for _, _, w, h in boxes[i]) <= SIZE / 2


@pytest.mark.fast
def test_boxes_lie_inside_their_image_and_area_is_the_box_area(tmp_path):
    counts = {'train': 8}
    generate(tmp_path / 'ds', counts)
    coco = json.loads((tmp_path / 'ds' / layout(counts)['train'][0]).read_text())
    assert len({ann['id'] for ann in coco['annotations']}) == len(coco['annotations'])
    for ann in coco['annotations']:
        x, y, w, h = ann['bbox']
        assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= SIZE and y + h <= SIZE
        assert ann['area'] == pytest.approx(w * h, abs=0.01)


@pytest.mark.fast
def test_a_failure_midway_keeps_the_previous_dataset_and_leaves_no_temp_dir(tmp_path, monkeypatch):
    out = tmp_path / 'ds'
    generate(out, {'train': 2, 'val': 1})
    before = digests(out)
    written = []

    def disk_full_on_the_third(image, path):
        written.append(path)
        if len(written) == 3:
            raise OSError(28, 'No space left on device')
        Image.fromarray(image).save(path, format='PNG')

    monkeypatch.setattr(synthetic, 'save_png', disk_full_on_the_third)
    with pytest.raises(OSError, match='No space left'):
        generate(out, {'train': 3, 'val': 2}, seed=9)
    assert len(written) == 3
    assert digests(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ['ds']


@pytest.mark.fast
def test_a_rerun_replaces_the_whole_directory(tmp_path):
    out = tmp_path / 'ds'
    out.mkdir()
    (out / 'stale.txt').write_text('from an older layout')
    generate(out, {'train': 1})
    assert not (out / 'stale.txt').exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ['ds']


@pytest.mark.fast
@pytest.mark.parametrize('bad', [{'small_image_fraction': 1.5}, {'max_objects': 0}, {'image_size': 16}, {'seed': -1}])
def test_bad_arguments_write_nothing(tmp_path, bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        generate(tmp_path / 'ds', {'train': 1}, **bad)
    assert not (tmp_path / 'ds').exists()


# ---------------------------------------------------------------- validate_coco


@pytest.fixture
def val_copy(tiny_dataset, tmp_path):
    """(annotation file, image dir, coco): a private copy of the tiny dataset's val split."""
    ann = tiny_dataset / 'annotations/instances_val.json'
    return ann, tiny_dataset / 'val', json.loads(ann.read_text())


def broken(ann: Path, coco: dict) -> Path:
    ann.write_text(json.dumps(coco))
    return ann


def assert_names(err: pytest.ExceptionInfo, ann: Path, *needles: str) -> None:
    message = str(err.value)
    assert isinstance(err.value, DatasetError)
    assert str(ann) in message, message
    for needle in needles:
        assert needle in message, message


@pytest.mark.fast
def test_accepts_the_generated_splits(tiny_dataset):
    for split in ('train', 'val', 'test'):
        coco = validate_coco(tiny_dataset / f'annotations/instances_{split}.json', tiny_dataset / split)
        assert coco['images'] and coco['annotations']


@pytest.mark.fast
def test_missing_annotation_file(tmp_path):
    with pytest.raises(DatasetError) as err:
        validate_coco(tmp_path / 'absent.json', tmp_path)
    assert_names(err, tmp_path / 'absent.json', 'not found')


@pytest.mark.fast
@pytest.mark.parametrize('text', ['{"images": [', 'not json at all', '\udcff'])
def test_not_json(val_copy, text):
    ann, img, _ = val_copy
    ann.write_bytes(text.encode('utf-8', 'surrogateescape'))
    with pytest.raises(DatasetError) as err:
        validate_coco(ann, img)
    assert_names(err, ann, 'JSON')


@pytest.mark.fast
def test_top_level_not_an_object(val_copy):
    ann, img, _ = val_copy
    ann.write_text('[]')
    with pytest.raises(DatasetError) as err:
        validate_coco(ann, img)
    assert_names(err, ann, 'list')


@pytest.mark.fast
@pytest.mark.parametrize('key', ['images', 'annotations', 'categories'])
@pytest.mark.parametrize('value', [None, {}])
def test_missing_or_non_list_section(val_copy, key, value):
    ann, img, coco = val_copy
    if value is None:
        del coco[key]
    else:
        coco[key] = value
    with pytest.raises(DatasetError) as err:
        validate_coco(broken(ann, coco), img)
    assert_names(err, ann, f"'{key}'")


@pytest.mark.fast
@pytest.mark.parametrize('kind, noun', [('images', 'image'), ('annotations', 'annotation'), ('categories', 'category')])
def test_duplicate_ids(val_copy, kind, noun):
    ann, img, coco = val_copy
    duplicate = dict(coco[kind][1], id=coco[kind][0]['id'])
    coco[kind][1] = duplicate
    with pytest.raises(DatasetError) as err:
        validate_coco(broken(ann, coco), img)
    assert_names(err, ann, f'{noun} id {duplicate["id"]} appears twice')


@pytest.mark.fast
@pytest.mark.parametrize('kind', ['images', 'annotations', 'categories'])
def test_entry_without_an_integer_id(val_copy, kind):
    ann, img, coco = val_copy
    coco[kind][0] = dict(coco[kind][0], id='7')
    with pytest.raises(DatasetError) as err:
        validate_coco(broken(ann, coco), img)
    assert_names(err, ann, 'integer id', "'7'")


@pytest.mark.fast
@pytest.mark.parametrize('change', [{'width': 0}, {'height': -3}, {'width': 64.0}, {'file_name': None}])
def test_image_entry_without_file_name_or_size(val_copy, change):
    ann, img, coco = val_copy
    coco['images'][2].update(change)
    with pytest.raises(DatasetError) as err:
        validate_coco(broken(ann, coco), img)
    assert_names(err, ann, f'image {coco["images"][2]["id"]}')


@pytest.mark.fast
@pytest.mark.parametrize('field, value', [('image_id', 999_999), ('category_id', 42)])
def test_unknown_image_or_category(val_copy, field, value):
    ann, img, coco = val_copy
    coco['annotations'][-1][field] = value
    with pytest.raises(DatasetError) as err:
        validate_coco(broken(ann, coco), img)
    assert_names(err, ann, f'annotation {coco["annotations"][-1]["id"]}', f'unknown {field} {value}')


@pytest.mark.fast
@pytest.mark.parametrize(
    'bbox', [[1, 2, 0, 5], [1, 2, 5, -1], [1, 2, 3], 'box', [1, 2, 3, float('nan')], [1, True, 3, 4], None]
)
def test_invalid_bbox(val_copy, bbox):
    ann, img, coco = val_copy
    coco['annotations'][0]['bbox'] = bbox
    ann.write_text(json.dumps(coco))  # NaN is written as the JSON extension NaN, which json reads back
    with pytest.raises(DatasetError) as err:
        validate_coco(ann, img)
    assert_names(err, ann, f'annotation {coco["annotations"][0]["id"]}', 'invalid bbox')


@pytest.mark.fast
@pytest.mark.parametrize('side', ['left', 'top', 'right', 'bottom'])
def test_bbox_outside_its_image_beyond_the_tolerance(val_copy, side):
    ann, img, coco = val_copy
    image = next(i for i in coco['images'] if i['id'] == coco['annotations'][0]['image_id'])
    width, height = image['width'], image['height']
    slack = coco_mod.BOX_TOLERANCE
    within = {
        'left': [-slack / 2, 0, 4, 4],
        'top': [0, -slack / 2, 4, 4],
        'right': [width - 4, 0, 4 + slack / 2, 4],
        'bottom': [0, height - 4, 4, 4 + slack / 2],
    }[side]
    beyond = {
        'left': [-2 * slack, 0, 4, 4],
        'top': [0, -2 * slack, 4, 4],
        'right': [width - 4, 0, 4 + 2 * slack, 4],
        'bottom': [0, height - 4, 4, 4 + 2 * slack],
    }[side]
    coco['annotations'][0]['bbox'] = within
    validate_coco(broken(ann, coco), img)
    coco['annotations'][0]['bbox'] = beyond
    with pytest.raises(DatasetError) as err:
        validate_coco(broken(ann, coco), img)
    assert_names(err, ann, f'annotation {coco["annotations"][0]["id"]}', 'outside', f'image {image["id"]}')


@pytest.mark.fast
def test_missing_image_file(val_copy):
    ann, img, coco = val_copy
    victim = coco['images'][3]
    (img / victim['file_name']).unlink()
    with pytest.raises(DatasetError) as err:
        validate_coco(ann, img)
    assert_names(err, ann, f'image {victim["id"]}', str(img / victim['file_name']))
    assert validate_coco(ann, img, check_images=False)['images'] == coco['images']


@pytest.mark.fast
@pytest.mark.parametrize('damage', ['truncated', 'garbage', 'flipped bytes'])
def test_image_that_does_not_decode(val_copy, damage):
    ann, img, coco = val_copy
    victim = coco['images'][1]
    path = img / victim['file_name']
    data = path.read_bytes()
    path.write_bytes(
        {
            'truncated': data[: len(data) // 2],
            'garbage': b'GIF89a nothing',
            'flipped bytes': data[:100] + bytes(b ^ 0xFF for b in data[100:200]) + data[200:],
        }[damage]
    )
    with pytest.raises(DatasetError) as err:
        validate_coco(ann, img)
    assert_names(err, ann, f'image {victim["id"]}', str(path), 'not a readable image')


@pytest.mark.fast
def test_image_whose_size_differs_from_its_entry(val_copy):
    ann, img, coco = val_copy
    victim = coco['images'][0]
    victim['width'] += 10  # wider: every box still fits, only the file disagrees
    with pytest.raises(DatasetError) as err:
        validate_coco(broken(ann, coco), img)
    assert_names(err, ann, f'image {victim["id"]}', f'{victim["width"]}x{victim["height"]}')


# ---------------------------------------------------------------- box arithmetic, split files


@pytest.mark.fast
def test_area_ratio_by_hand():
    # (10*10 + 20*10) / (40*20) = 300 / 800; overlapping boxes count twice
    assert area_ratio([[0, 0, 10, 10], [5, 5, 20, 10]], 40, 20) == pytest.approx(0.375)
    assert area_ratio([[0, 0, 40, 20], [0, 0, 40, 20]], 40, 20) == pytest.approx(2.0)
    assert area_ratio(np.array([[1, 1, 4, 5]]), 10, 10) == pytest.approx(0.2)
    assert area_ratio([], 40, 20) == 0.0
    for width, height in ((0, 20), (40, -1)):
        with pytest.raises(ValueError, match='positive'):
            area_ratio([[0, 0, 1, 1]], width, height)


@pytest.mark.fast
@pytest.mark.parametrize(
    'box, expected',
    [
        ((1.234, 2.345, 3.456, 4.567), [1.23, 2.35, 3.46, 4.56]),  # corners rounded, then the size
        ((-3.0, -1.0, 10.0, 5.0), [0.0, 0.0, 7.0, 4.0]),  # clipped at the top left
        ((60.0, 62.5, 10.0, 10.0), [60.0, 62.5, 4.0, 1.5]),  # clipped at the bottom right
        ((70.0, 10.0, 5.0, 5.0), [64.0, 10.0, 0.0, 5.0]),  # entirely outside: no width left
    ],
)
def test_rounded_box(box, expected):
    assert rounded_box(*box, 64, 64) == pytest.approx(expected)


@pytest.mark.fast
def test_rounded_box_never_reaches_past_the_image():
    rng = np.random.default_rng(0)
    for x, y, w, h in rng.uniform(-20, 80, size=(500, 4)):
        bx, by, bw, bh = rounded_box(x, y, abs(w), abs(h), 64, 48)
        assert 0 <= bx and 0 <= by and bw >= 0 and bh >= 0
        assert bx + bw <= 64 + 1e-9 and by + bh <= 48 + 1e-9
        assert all(round(v, 2) == v for v in (bx, by, bw, bh))


@pytest.mark.fast
def test_split_files_from_a_dict_and_from_validated_params():
    from dfmsd.core.params import Data

    data = {
        'root': 'data/mine',
        'generate': False,
        'splits': {
            'train': {'ann': 'a/train.json', 'img': 'imgs/tr/'},
            'val': {'ann': 'a/val.json', 'img': 'imgs/va/'},
            'test': {'ann': 'a/test.json', 'img': 'imgs/te/'},
        },
    }
    expected = (Path('data/mine/a/val.json'), Path('data/mine/imgs/va'))
    assert split_files(data, 'val') == expected
    assert split_files(Data.model_validate(data), 'val') == expected
    with pytest.raises(KeyError):
        split_files(data, 'holdout')


@pytest.mark.fast
def test_split_manifest_follows_the_content_of_the_annotation_and_every_image(tiny_dataset, tmp_path):
    """The other stages depend on these digests instead of the dataset directory, so any edit
    that changes what a stage would read must change them, and a byte-identical copy must not."""
    ann, img = tiny_dataset / 'annotations/instances_val.json', tiny_dataset / 'val'
    manifest = coco_mod.split_manifest(ann, img, validate_coco(ann, img))
    assert manifest['images'] == 8
    copy = Path(shutil.copytree(tiny_dataset, tmp_path / 'copy'))
    copy_ann, copy_img = copy / 'annotations/instances_val.json', copy / 'val'
    assert coco_mod.split_manifest(copy_ann, copy_img, validate_coco(copy_ann, copy_img)) == manifest

    first = sorted(copy_img.iterdir())[0]
    first.write_bytes(first.read_bytes() + b'\0')  # one byte more in one image
    edited = coco_mod.split_manifest(copy_ann, copy_img, validate_coco(copy_ann, copy_img, check_images=False))
    assert edited['images_sha256'] != manifest['images_sha256'] and edited['ann_sha256'] == manifest['ann_sha256']

    coco = json.loads(ann.read_text())
    coco['annotations'][0]['bbox'][0] += 1
    copy_ann.write_text(json.dumps(coco))
    assert coco_mod.split_manifest(copy_ann, img, coco)['ann_sha256'] != manifest['ann_sha256']
