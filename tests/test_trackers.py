"""The DVCLive tracker (``train.trackers: [dvclive]``) as mmengine's Visualizer builds it for a run."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.fast


def test_dvclive_tracker_writes_its_plots_where_readme_says_and_nothing_else(tmp_path, monkeypatch):
    """Loss curves under ``<work dir>/<timestamp>/vis_data/plots/metrics`` (README's
    ``dvc plots show`` path); no dvc.yaml, DVC repo, params file or experiment anywhere, which
    mmengine's own DVCLiveVisBackend would leave in the working directory."""
    import mmengine
    from mmengine.visualization import Visualizer

    import dfmsd.models  # noqa: F401  (registers QuietDVCLiveVisBackend)

    monkeypatch.chdir(tmp_path)
    log_dir = tmp_path / 'work_dirs/baseline-retinanet-0-0123456789ab/20260101_000000'
    visualizer = Visualizer(
        name='test_trackers', vis_backends=[dict(type='QuietDVCLiveVisBackend')], save_dir=str(log_dir)
    )
    visualizer.add_config(mmengine.Config(dict(model=dict(type='RetinaNet'))))
    for step, loss in enumerate([1.0, 0.5], 1):
        visualizer.add_scalars({'loss': loss, 'lr': 0.01}, step=step)
    visualizer.close()
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob('*') if p.is_file())
    vis_data = log_dir.relative_to(tmp_path) / 'vis_data'
    assert written == [
        vis_data / 'metrics.json',
        vis_data / 'plots/metrics/loss.tsv',
        vis_data / 'plots/metrics/lr.tsv',
    ]
    assert not list(tmp_path.rglob('.dvc'))
    rows = [r.split('\t') for r in (log_dir / 'vis_data/plots/metrics/loss.tsv').read_text().splitlines()]
    assert rows[0][-1] == 'loss' and [float(r[-1]) for r in rows[1:]] == [1.0, 0.5]
