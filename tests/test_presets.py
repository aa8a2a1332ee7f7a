"""Presets (dfmsd.core.presets) and running one in its own worktree (flows.presets): the
repository's params.yaml, dvc.yaml and committed results stay as they are."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import yaml
from support import REPO, copy_project, env

from dfmsd.core.errors import ParamsError
from dfmsd.core.params import read_yaml
from dfmsd.core.presets import deep_merge, preset_overrides, preset_params

PRESETS = sorted(p.stem for p in (REPO / 'presets').glob('*.yaml'))


# ---------------------------------------------------------------- deep_merge


@pytest.mark.fast
def test_mappings_merge_key_by_key_and_other_values_are_replaced():
    base = {
        'train': {'lr': 0.1, 'iters': 10, 'optimizer': {'type': 'SGD', 'momentum': 0.9}},
        'seeds': [0, 1, 2],
        'data': {'root': 'd'},
    }
    override = {'train': {'iters': 20, 'optimizer': {'momentum': 0.8}}, 'seeds': [5], 'data': 'elsewhere'}
    assert deep_merge(base, override) == {
        'train': {'lr': 0.1, 'iters': 20, 'optimizer': {'type': 'SGD', 'momentum': 0.8}},
        'seeds': [5],
        'data': 'elsewhere',
    }


@pytest.mark.fast
def test_replace_swaps_a_whole_mapping_at_any_depth():
    base = {
        'pairs': {'big': {'weak': {'config': 'a.py', 'iters': 5}}},
        'methods': {'mgd': {'label': 'MGD', 'losses': {'feature': {'type': 'MGDLoss', 'lambda_mgd': 0.65}}}},
    }
    override = {
        'pairs': {'_replace': True, 'tiny': {'weak': {'config': 'b.py'}}},
        'methods': {'mgd': {'losses': {'_replace': True, 'feature': {'type': 'DMKDLoss'}}}},
        'me': {'_replace': True, 'threshold': 0.4},  # a key the base lacks
        'students': {'new': {'config': {'_replace': True, 'x': 1}}},
    }  # nested inside a new key
    assert deep_merge(base, override) == {
        'pairs': {'tiny': {'weak': {'config': 'b.py'}}},
        'methods': {'mgd': {'label': 'MGD', 'losses': {'feature': {'type': 'DMKDLoss'}}}},
        'me': {'threshold': 0.4},
        'students': {'new': {'config': {'x': 1}}},
    }


@pytest.mark.fast
def test_merging_changes_neither_input():
    base = {'a': {'b': [1, 2], 'c': {'d': 1}}}
    override = {'a': {'c': {'e': 2}, 'f': {'_replace': True, 'g': [3]}}}
    saved = copy.deepcopy((base, override))
    merged = deep_merge(base, override)
    merged['a']['b'].append(9)
    merged['a']['f']['g'].append(9)
    assert (base, override) == saved


# ---------------------------------------------------------------- preset files


def write_presets(folder, **presets) -> None:
    folder.mkdir(exist_ok=True)
    for name, body in presets.items():
        (folder / f'{name}.yaml').write_text(yaml.safe_dump(body, sort_keys=False))


@pytest.mark.fast
def test_extends_merges_a_chain_in_order(tmp_path):
    presets = tmp_path / 'presets'
    write_presets(
        presets,
        base={'seeds': [0, 1], 'train': {'iters': 30, 'batch_size': 2}},
        middle={'extends': 'base', 'train': {'iters': 20}, 'me': {'threshold': 0.4}},
        top={'extends': 'middle', 'train': {'checkpoint_interval': 5}, 'seeds': [0, 7]},
    )
    merged = preset_params('top', REPO / 'params.yaml', presets)
    assert merged['seeds'] == [0, 7]
    assert merged['train'] == read_yaml(REPO / 'params.yaml')['train'] | {
        'iters': 20,
        'batch_size': 2,
        'checkpoint_interval': 5,
    }
    assert merged['me']['threshold'] == 0.4 and 'extends' not in merged
    assert preset_overrides('top', presets)['train'] == {'iters': 20, 'batch_size': 2, 'checkpoint_interval': 5}


@pytest.mark.fast
def test_replace_in_a_chain_reaches_params_yaml(tmp_path):
    """A preset that extends another keeps its own `_replace`, and the one it extends, for the
    merge over params.yaml: what is replaced there is replaced, not merged."""
    presets = tmp_path / 'presets'
    student = {'config': 'configs/small/fcos.py', 'depth': 18, 'width': 8, 'fpn_channels': 16}
    write_presets(
        presets,
        base={'students': {'_replace': True, 'fcos': student}, 'figures': {'student': 'fcos'}},
        adds={'extends': 'base', 'students': {'gfl': dict(student, config='configs/small/gfl.py')}},
        swaps={'extends': 'base', 'students': {'_replace': True, 'atss': student}, 'figures': {'student': 'atss'}},
    )
    assert set(read_yaml(REPO / 'params.yaml')['students']) - {'fcos', 'gfl', 'atss'}
    assert set(preset_params('base', REPO / 'params.yaml', presets)['students']) == {'fcos'}
    assert set(preset_params('adds', REPO / 'params.yaml', presets)['students']) == {'fcos', 'gfl'}
    assert set(preset_params('swaps', REPO / 'params.yaml', presets)['students']) == {'atss'}


@pytest.mark.fast
def test_extends_in_a_loop_is_an_error(tmp_path):
    presets = tmp_path / 'presets'
    write_presets(
        presets,
        one={'extends': 'two'},
        two={'extends': 'three'},
        three={'extends': 'one'},
        self_ref={'extends': 'self_ref'},
    )
    with pytest.raises(ParamsError, match='one -> two -> three -> one'):
        preset_params('one', REPO / 'params.yaml', presets)
    with pytest.raises(ParamsError, match='self_ref -> self_ref'):
        preset_params('self_ref', REPO / 'params.yaml', presets)


@pytest.mark.fast
def test_unknown_preset_lists_the_known_ones(tmp_path):
    presets = tmp_path / 'presets'
    write_presets(presets, smoke={'seeds': [0]}, coco_table1={'seeds': [1]}, child={'extends': 'missing'})
    with pytest.raises(ParamsError) as err:
        preset_params('smok', REPO / 'params.yaml', presets)
    assert "'smok'" in str(err.value) and 'child, coco_table1, smoke' in str(err.value)
    with pytest.raises(ParamsError) as err:
        preset_params('child', REPO / 'params.yaml', presets)
    assert str(err.value).startswith(f"{presets / 'child.yaml'}: extends: no preset 'missing' (known: child, ")


@pytest.mark.fast
def test_extends_must_name_one_preset(tmp_path):
    presets = tmp_path / 'presets'
    write_presets(presets, child={'extends': ['smoke', 'coco']})
    with pytest.raises(ParamsError, match=r"child\.yaml: extends: give one preset name, got \['smoke', 'coco'\]"):
        preset_params('child', REPO / 'params.yaml', presets)


@pytest.mark.fast
def test_a_preset_that_breaks_the_schema_names_the_preset_and_the_key(tmp_path):
    presets = tmp_path / 'presets'
    write_presets(presets, bad={'train': {'iters': 0}})
    with pytest.raises(ParamsError) as err:
        preset_params('bad', REPO / 'params.yaml', presets)
    assert 'bad.yaml' in str(err.value) and 'train.iters' in str(err.value)


@pytest.mark.fast
@pytest.mark.parametrize('name', PRESETS)
def test_every_preset_validates(name):
    res = subprocess.run(
        [sys.executable, '-m', 'dfmsd.check', '--preset', name, '--shallow'],
        cwd=REPO,
        env=env(PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert f'presets/{name}.yaml: valid' in res.stdout


# ---------------------------------------------------------------- the preset's worktree


def git(*args: str, cwd) -> str:
    return subprocess.run(['git', *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def test_a_preset_runs_in_its_own_worktree_and_leaves_the_repository_as_it_was(tmp_path):
    from flows.presets import OWN_OUTPUTS, WORKTREES, preset_worktree

    root = copy_project(tmp_path / 'project').resolve()
    committed = {name: (root / name).read_bytes() for name in ('params.yaml', 'dvc.yaml')}
    assert git('status', '--porcelain', cwd=root) == ''

    tree = preset_worktree(root, 'smoke')

    assert tree == root / WORKTREES / 'smoke'
    assert git('status', '--porcelain', cwd=root) == ''
    assert {name: (root / name).read_bytes() for name in committed} == committed
    # the current commit with the preset's params; one DVC cache for both
    assert git('rev-parse', 'HEAD', cwd=tree) == git('rev-parse', 'HEAD', cwd=root)
    assert yaml.safe_load((tree / 'params.yaml').read_text()) == preset_params_of(root, 'smoke')
    smoke = read_yaml(root / 'presets/smoke.yaml')
    assert read_yaml(tree / 'params.yaml')['train']['iters'] == smoke['train']['iters']
    assert read_yaml(root / 'params.yaml')['train']['iters'] != smoke['train']['iters']
    assert (tree / 'dvc.yaml').read_bytes() == committed['dvc.yaml']
    cache = subprocess.run(
        [sys.executable, '-m', 'dvc', 'cache', 'dir'], cwd=tree, env=env(), check=True, capture_output=True, text=True
    ).stdout.strip()
    assert cache == str(root / '.dvc' / 'cache')

    # The preset's run writes its own results; meanwhile the workspace changes (and holds results
    # of a default run, not committed yet); then the preset runs again.
    assert {'dvc.lock', 'metrics'} <= set(OWN_OUTPUTS)
    (tree / 'metrics').mkdir(exist_ok=True)
    (tree / 'metrics/smoke-run.json').write_text('{"mAP": 2.0}\n')
    (tree / 'dvc.lock').write_text('schema: "2.0"\nstages: {data: {}}\n')
    own = {rel: (tree / rel).read_bytes() for rel in ('metrics/smoke-run.json', 'dvc.lock')}
    (tree / 'dfmsd/data/coco.py').write_text('# edited by hand inside the worktree\n')
    (root / 'dfmsd/data/me.py').write_text((root / 'dfmsd/data/me.py').read_text() + '\n# work in progress\n')
    (root / 'notes.md').write_text('new, not added yet\n')
    (root / 'README.md').unlink()
    (root / 'metrics').mkdir(exist_ok=True)
    (root / 'metrics/default.json').write_text('{"mAP": 1.0}\n')
    (root / 'dvc.lock').write_text('schema: "2.0"\nstages: {}\n')
    status = git('status', '--porcelain', cwd=root)

    assert preset_worktree(root, 'smoke') == tree

    assert git('status', '--porcelain', cwd=root) == status
    assert {name: (root / name).read_bytes() for name in committed} == committed
    assert {rel: (tree / rel).read_bytes() for rel in own} == own
    assert not (tree / 'metrics/default.json').exists()
    # the workspace's uncommitted changes are carried, the worktree's own edits reset
    assert (tree / 'dfmsd/data/me.py').read_bytes() == (root / 'dfmsd/data/me.py').read_bytes()
    assert (tree / 'notes.md').read_bytes() == (root / 'notes.md').read_bytes()
    assert not (tree / 'README.md').exists()
    assert (tree / 'dfmsd/data/coco.py').read_bytes() == (root / 'dfmsd/data/coco.py').read_bytes()
    assert yaml.safe_load((tree / 'params.yaml').read_text()) == preset_params_of(root, 'smoke')


def preset_params_of(root, name: str) -> dict:
    return preset_params(name, root / 'params.yaml', root / 'presets')


@pytest.mark.fast
def test_an_invalid_preset_creates_no_worktree(tmp_path):
    from flows.presets import WORKTREES, preset_worktree

    root = copy_project(tmp_path / 'project')
    (root / 'presets/broken.yaml').write_text('train: {iters: -1}\n')
    with pytest.raises(ParamsError, match='train.iters'):
        preset_worktree(root, 'broken')
    assert not (root / WORKTREES).exists()
    assert git('worktree', 'list', cwd=root).count('\n') == 1


# ---------------------------------------------------------------- publishing a preset's report


def test_publish_copies_a_finished_preset_run_with_its_commit_and_refuses_anything_else(tmp_path, capsys):
    import dvc_demo as demo

    from flows.presets import preset_worktree
    from flows.publish import PublishError, main, publish

    root = demo.make_project(tmp_path / 'proj', presets={'tiny': {'seeds': [0, 7]}})
    out = root / 'reports' / 'presets' / 'tiny'

    def repro(tree):
        subprocess.run(
            [sys.executable, '-m', 'dvc', 'repro'],
            cwd=tree,
            env=env(PYTHONPATH=str(REPO)),
            check=True,
            capture_output=True,
        )

    with pytest.raises(PublishError, match='no report'):  # never ran
        publish(root, 'tiny')
    tree = preset_worktree(root, 'tiny')
    repro(tree)

    assert publish(root, 'tiny') == out
    assert (out / 'results.md').read_bytes() == (tree / 'reports' / 'results.md').read_bytes()
    assert (out / 'preset-dvc.lock').read_bytes() == (tree / 'dvc.lock').read_bytes()
    assert yaml.safe_load((out / 'params.merged.yaml').read_text())['seeds'] == [0, 7]
    commit = git('rev-parse', 'HEAD', cwd=root).strip()
    assert f'git checkout {commit} && make repro PRESET=tiny' in (out / 'RUN.md').read_text()
    published = {p.relative_to(out): p.read_bytes() for p in out.rglob('*') if p.is_file()}

    # the preset changes: its worktree's run is stale until it runs again
    (root / 'presets' / 'tiny.yaml').write_text('seeds: [0, 8]\n')
    preset_worktree(root, 'tiny')
    with pytest.raises(PublishError, match=r'not up to date .*prepare'):
        publish(root, 'tiny')
    # a run that carried uncommitted code has no commit to name
    (root / 'presets' / 'tiny.yaml').write_text('seeds: [0, 7]\n')
    (root / 'step.py').write_text((root / 'step.py').read_text() + '\n# work in progress\n')
    repro(preset_worktree(root, 'tiny'))
    assert main(['tiny', '--repo', str(root)]) == 2
    assert "error [publish]: preset 'tiny' ran with changes that are not in its commit (" in capsys.readouterr().err
    # what was published stays as it was, and nothing half-written is left beside it
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob('*') if p.is_file()} == published
    assert sorted(p.name for p in out.parent.iterdir()) == ['tiny']
