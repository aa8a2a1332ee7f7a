"""mmengine's Runner with logs a person reads: one line of set-up, then the training progress."""

from __future__ import annotations

import logging

from mmengine.config import Config
from mmengine.logging import MMLogger
from mmengine.runner import Runner

#: INFO lines that reach the console: progress, resume, and the project's own messages.
_KEPT_INFO = (
    'Iter(train)',
    'Iter(val)',
    'Epoch(',
    'resum',
    'Advance dataloader',
    'SAL hand-off',
    'Load checkpoint',
    'Saving checkpoint',
    '[dfmsd]',
)


class _ConciseFilter(logging.Filter):
    """Warnings and above, plus the INFO lines of _KEPT_INFO; mmengine's per-parameter init
    table, hook table and config dump stay in the work dir's log file."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        message = record.getMessage()
        return any(mark in message for mark in _KEPT_INFO)


class ConciseRunner(Runner):
    def build_logger(self, log_level='INFO', log_file=None, **kwargs) -> MMLogger:
        logger = super().build_logger(log_level=log_level, log_file=log_file, **kwargs)
        for handler in logger.handlers:
            if type(handler) is logging.StreamHandler and not any(
                isinstance(f, _ConciseFilter) for f in handler.filters
            ):
                handler.addFilter(_ConciseFilter())
        return logger

    def _log_env(self, env_cfg: dict) -> None:
        import mmcv
        import mmdet
        import mmengine
        import torch

        self.logger.info(
            f'[dfmsd] torch {torch.__version__} ({torch.get_num_threads()} threads), mmcv '
            f'{mmcv.__version__}, mmdet {mmdet.__version__}, mmengine {mmengine.__version__}, '
            f'seed {self.seed}, deterministic {self._deterministic}, world size {self.world_size}'
        )


def build_runner(cfg: Config) -> Runner:
    """A Runner whose visualizer is its own: mmengine reuses a global visualizer by name,
    which would keep writing into an earlier runner's (possibly deleted) work dir."""
    if cfg.get('visualizer'):
        cfg.visualizer.pop('name', None)  # defaults to the runner's unique experiment name
    return ConciseRunner.from_cfg(cfg)
