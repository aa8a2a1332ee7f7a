"""Training trackers: mmengine's DVCLive backend without its side effects.

mmengine's ``DVCLiveVisBackend`` runs ``dvc init -f --no-scm`` in the working directory when
git has no user identity (a fresh CI clone), saves a DVC experiment at the end of every run,
adds its metrics to dvc.yaml and logs every file of the work dir as an artifact. Inside a
DVC stage all four are wrong: this backend keeps DVCLive's own files (``metrics.json`` and
``plots/metrics/*.tsv``) and does nothing else, so that a long run can be watched live
(``dvc plots show work_dirs/<run>/<timestamp>/vis_data/plots/metrics``).

The committed loss log stays ``logs/<run>.csv``, collected from mmengine's own scalars:
DVCLive appends the iterations a resumed run repeats, so its files are not byte-identical
to an uninterrupted run's, and the CSV is (tests/test_training.py).
"""

from __future__ import annotations

from mmengine.registry import VISBACKENDS
from mmengine.visualization.vis_backend import DVCLiveVisBackend, force_init_env


@VISBACKENDS.register_module()
class QuietDVCLiveVisBackend(DVCLiveVisBackend):
    def _init_env(self):
        from dvclive import Live

        kwargs = dict(self._init_kwargs or {})
        kwargs.update(dir=self._save_dir, save_dvc_exp=False, dvcyaml=None, report=None, resume=True)
        self._dvclive = Live(**kwargs)

    @force_init_env
    def add_config(self, config, **kwargs) -> None:  # the config is saved as train.py instead
        return None

    def close(self) -> None:
        if hasattr(self, '_dvclive'):
            self._dvclive.end()
