"""Look-ups in mmdet's model-zoo index (dfmsd.engine.zoo): the index that ships with the
installed mmdet (properties only, no hashes or box APs copied from it), and small indexes
written by the tests for the parsing rules."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from collections import Counter
from pathlib import Path

import pytest
import yaml

from dfmsd.engine import zoo
from dfmsd.engine.zoo import ZooModel, find_model, list_models

pytestmark = [pytest.mark.timeout(60), pytest.mark.fast]
needs_mmdet = pytest.mark.skipif(importlib.util.find_spec('mmdet') is None, reason='mmdet is not installed')


def _norm(name: str) -> str:
    return name.lower().replace('-', '_')


# ---------------------------------------------------------------- the installed index


@needs_mmdet
def test_every_indexed_model_has_weights_a_config_and_a_hash_from_its_file_name():
    models = list_models()
    root = zoo.mim_dir()
    assert (root / 'model-index.yml').is_file()
    assert len(models) >= 100  # a parse that loses most metafiles fails here
    assert len({m.name for m in models}) == len(models)
    for m in models:
        assert isinstance(m, ZooModel)
        assert os.path.isabs(m.config) and m.config.startswith(str(root)), m
        assert os.path.isfile(m.config), m  # incl. the repaired "gn%2Bws" / bare-name entries
        assert m.url.startswith('https://') and m.url.endswith('.pth'), m
        assert m.box_ap is None or 0 < m.box_ap <= 100, m
        file_name = m.url.rsplit('/', 1)[1]
        if m.sha256_prefix:
            assert re.fullmatch(r'[0-9a-f]{8,64}', m.sha256_prefix), m
            assert file_name.endswith(f'-{m.sha256_prefix}.pth'), m
        else:  # only a file name without a hash gives none (then the download needs a pinned sha256)
            assert not re.search(r'-[0-9a-f]{8,}\.pth$', file_name), m
    assert sum(bool(m.sha256_prefix) for m in models) >= 0.9 * len(models)


@needs_mmdet
def test_every_model_resolves_by_its_name_config_path_and_unique_config_stem():
    models = list_models()
    stems = Counter(Path(m.config).stem for m in models)
    names = {m.name for m in models}
    for m in models:
        assert find_model(m.name) is m
        assert find_model(f'  {m.name} ') is m
        stem = Path(m.config).stem
        if stems[stem] == 1 and (stem == m.name or stem not in names):
            assert find_model(m.config) is m
            assert find_model(f'configs/whatever/{stem}.py') is m
            assert find_model(stem) is m


@needs_mmdet
def test_mmdet2_spellings_resolve_when_unambiguous():
    models = list_models()
    spellings = Counter(_norm(m.name) for m in models)
    exact = {m.name for m in models} | {Path(m.config).stem for m in models}
    tried = 0
    for m in models:
        old = m.name.replace('-', '_')
        if old != m.name and spellings[_norm(m.name)] == 1 and old not in exact:
            assert find_model(old) is m
            tried += 1
    assert tried >= 50
    assert find_model('faster_rcnn_r50_fpn_1x_coco').name == 'faster-rcnn_r50_fpn_1x_coco'


@needs_mmdet
def test_a_config_stem_different_from_the_name():
    # mmdet 3 renamed the config; the metafile kept the mmdet 2.x name
    m = find_model('faster-rcnn_r50_fpn_ms-3x_coco')
    assert m.name == 'faster-rcnn_r50_fpn_mstrain_3x_coco'
    assert find_model('configs/faster_rcnn/faster-rcnn_r50_fpn_ms-3x_coco.py') is m
    assert Path(m.config).name == 'faster-rcnn_r50_fpn_ms-3x_coco.py'


@needs_mmdet
def test_url_encoded_config_directory_is_repaired():
    m = find_model('mask-rcnn_r101_fpn_gn-ws-all_2x_coco')  # the metafile says configs/gn%2Bws/...
    assert os.path.isfile(m.config) and 'gn+ws' in m.config


@needs_mmdet
@pytest.mark.parametrize(
    'query, suggested',
    [
        ('retinanet_r50_fpn_1x_cocoo', 'retinanet_r50_fpn_1x_coco'),
        ('gfl_r101_fpn_2x_coco', 'gfl_r101_fpn_ms-2x_coco'),
        ('fcos_r50_fpn_2x_coco', 'fcos_r50-caffe_fpn_gn-head_ms-640-800-2x_coco'),
        ('swin-t', 'mask-rcnn_swin-t-p4-w7_fpn_1x_coco'),
    ],
)
def test_unknown_name_suggests_close_matches(query, suggested):
    with pytest.raises(KeyError) as err:
        find_model(query)
    message = str(err.value)
    assert f"unknown mmdet model zoo entry '{query}'" in message and suggested in message


@needs_mmdet
def test_a_name_resembling_nothing_gets_no_suggestion():
    with pytest.raises(KeyError) as err:
        find_model('definitely-not-a-model')
    assert 'close matches' not in str(err.value)


@needs_mmdet
def test_list_models_returns_a_fresh_list_of_frozen_entries():
    a, b = list_models(), list_models()
    assert a == b and a is not b
    a.clear()
    assert list_models() == b
    with pytest.raises(dataclasses.FrozenInstanceError):
        b[0].name = 'x'  # type: ignore[misc]


# ---------------------------------------------------------------- parsing rules, on a small index


def model(name: str, config: str, weights, results=None) -> dict:
    entry = {'Name': name, 'Config': config, 'Weights': weights}
    if results is not None:
        entry['Results'] = results
    return entry


def box_ap(ap, dataset='COCO') -> dict:
    return {'Task': 'Object Detection', 'Dataset': dataset, 'Metrics': {'box AP': ap}}


URL = 'https://download.example.org/mmdetection/v3.0/{}'


@pytest.fixture
def small_index(tmp_path, monkeypatch):
    """A .mim directory with two metafiles and their quirks, in place of the installed one."""
    root = tmp_path / 'mim'
    for rel in (
        'configs/retinanet/retinanet_a.py',
        'configs/retinanet/retinanet_b.py',
        'configs/gn+ws/mask-rcnn_gn-ws.py',
        'configs/albu_example/albu_bare.py',
        'configs/retinanet/shared_cfg.py',
    ):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text('# config\n')
    retinanet = {
        'Models': [
            model(
                'retinanet_a',
                'configs/retinanet/retinanet_a.py',
                URL.format('retinanet_a_20200130-c2398f9e.pth'),
                [box_ap(30.1, 'LVIS'), box_ap(36.5)],
            ),
            model(
                'retinanet-b',
                'configs/retinanet/retinanet_b.py',
                URL.format('retinanet_b_20200130-deadbeefcafe.pth'),
                [box_ap('n/a')],
            ),
            model('retinanet_a', 'configs/retinanet/retinanet_b.py', URL.format('dup-00000000.pth')),  # duplicate
            model('no_weights', 'configs/retinanet/retinanet_a.py', None),
            model('local_weights', 'configs/retinanet/retinanet_a.py', 'work_dirs/latest.pth'),
            model('shared_one', 'configs/retinanet/shared_cfg.py', URL.format('s1-11111111.pth')),
            model('shared_two', 'configs/retinanet/shared_cfg.py', URL.format('s2-22222222.pth')),
            model('ddq_like', 'configs/retinanet/retinanet_a.py', URL.format('ddq_detr_5scale_coco_1x.pth')),
        ]
    }
    quirks = {
        'Models': [
            model('mask-rcnn_gn-ws', 'configs/gn%2Bws/mask-rcnn_gn-ws.py', URL.format('gn-ws-12345678.pth')),
            model('albu_bare', 'albu_bare.py', URL.format('albu-87654321.pth')),
            model('not_shipped', 'configs/gone/not_shipped.py', URL.format('gone-abcdef12.pth')),
        ]
    }
    (root / 'configs/retinanet/metafile.yml').write_text(yaml.safe_dump(retinanet))
    (root / 'configs/albu_example/metafile.yml').write_text(yaml.safe_dump(quirks))
    (root / 'model-index.yml').write_text(
        yaml.safe_dump(
            {
                'Import': [
                    'configs/retinanet/metafile.yml',
                    'configs/albu_example/metafile.yml',
                    'configs/missing/metafile.yml',
                ]
            }
        )
    )
    monkeypatch.setattr(zoo, 'mim_dir', lambda: root.resolve())
    return root.resolve()


def test_only_entries_with_downloadable_weights_are_indexed_first_name_wins(small_index):
    names = [m.name for m in list_models()]
    assert names == [
        'retinanet_a',
        'retinanet-b',
        'shared_one',
        'shared_two',
        'ddq_like',
        'mask-rcnn_gn-ws',
        'albu_bare',
        'not_shipped',
    ]
    assert find_model('retinanet_a').config == str(small_index / 'configs/retinanet/retinanet_a.py')


def test_hash_prefix_comes_from_the_file_name(small_index):
    assert find_model('retinanet_a').sha256_prefix == 'c2398f9e'
    assert find_model('retinanet-b').sha256_prefix == 'deadbeefcafe'
    assert find_model('ddq_like').sha256_prefix == ''


def test_box_ap_prefers_coco_and_ignores_non_numbers(small_index):
    assert find_model('retinanet_a').box_ap == 36.5
    assert find_model('retinanet-b').box_ap is None
    assert find_model('shared_one').box_ap is None


def test_config_paths_are_repaired_or_kept_literal(small_index):
    assert find_model('mask-rcnn_gn-ws').config == str(small_index / 'configs/gn+ws/mask-rcnn_gn-ws.py')
    assert find_model('albu_bare').config == str(small_index / 'configs/albu_example/albu_bare.py')
    assert find_model('not_shipped').config == str(small_index / 'configs/gone/not_shipped.py')


def test_resolution_order_and_ambiguity(small_index):
    assert find_model('configs/retinanet/retinanet_b.py').name == 'retinanet-b'  # by its unique config stem
    assert find_model('retinanet_b').name == 'retinanet-b'  # a 2.x spelling
    assert find_model('RetinaNet-A').name == 'retinanet_a'
    with pytest.raises(KeyError, match='several mmdet zoo models: shared_one, shared_two'):
        find_model('shared_cfg')
    with pytest.raises(KeyError) as err:
        find_model('retinanet_c')
    assert 'retinanet_a' in str(err.value) and 'among 8 models' in str(err.value)


def test_fetching_a_model_without_a_hash_needs_a_pinned_digest(small_index, tmp_path):
    from dfmsd.core.errors import DownloadError
    from dfmsd.engine.download import fetch_zoo_teacher

    with pytest.raises(DownloadError, match='unverifiable'):  # refused before any connection
        fetch_zoo_teacher('ddq_like', tmp_path / 'cache')
    assert not (tmp_path / 'cache').exists()
