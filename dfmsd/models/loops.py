"""The training loop of one SAL stage: the row's whole schedule, stopped at the stage's end."""

from __future__ import annotations

from mmdet.registry import LOOPS
from mmengine.runner import IterBasedTrainLoop


@LOOPS.register_module()
class StagedIterBasedTrainLoop(IterBasedTrainLoop):
    """IterBasedTrainLoop over ``max_iters`` (what the schedulers see) that stops at
    ``stop_at``: SAL stage k trains iterations [start, stop_at) of one schedule."""

    def __init__(self, runner, dataloader, max_iters: int, stop_at: int | None = None, **kwargs):
        super().__init__(runner, dataloader, max_iters, **kwargs)
        self.stop_at = max_iters if stop_at is None else int(stop_at)
        if not 0 < self.stop_at <= max_iters:
            raise ValueError(f'stop_at must be in (0, max_iters={max_iters}], got {stop_at}')

    def run_iter(self, data_batch) -> None:
        super().run_iter(data_batch)
        if self._iter >= self.stop_at:
            self.stop_training = True
