"""Training hooks: stop a diverged run, warn about a mis-scaled loss, hand SAL stages over."""

from __future__ import annotations

import math

import torch
from mmdet.registry import HOOKS
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.optim import AmpOptimWrapper
from torch import nn

from dfmsd.core.errors import TrainingDiverged


def _finite(value) -> bool:
    return value is not None and math.isfinite(float(value))


@HOOKS.register_module()
class DivergenceGuard(Hook):
    """Stop the run when the loss or the gradient norm is non-finite ``patience`` times in a row.

    A run whose gradient is inf/NaN at every step learns nothing, yet would finish and be
    reported as if all were well. Under mixed precision (AmpOptimWrapper) a non-finite
    gradient is the loss scaler's business: it skips that step and lowers the scale, so only
    a non-finite loss counts there.
    """

    priority = 'VERY_LOW'

    def __init__(self, patience: int = 3):
        self.patience, self.bad = patience, 0

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        hub = runner.message_hub
        loss = (outputs or {}).get('loss')
        grad = hub.get_scalar('train/grad_norm').current() if 'train/grad_norm' in hub.log_scalars else None
        scaled = isinstance(runner.optim_wrapper, AmpOptimWrapper)
        finite = _finite(loss) and (grad is None or scaled or _finite(grad))
        self.bad = 0 if finite else self.bad + 1
        if self.bad >= self.patience:
            raise TrainingDiverged(
                f'training diverged: loss {float(loss) if loss is not None else None}, gradient norm {grad} '
                f'were not finite for {self.bad} consecutive iterations (last: iteration {runner.iter + 1}); '
                f'lower the loss weights or the learning rate'
            )


@HOOKS.register_module()
class LossScaleCheck(Hook):
    """Warn once when the distillation terms start far outside the calibrated range.

    Loss weights are calibrated so that the distillation term starts at about the size of
    the detection loss (benchmarks/loss_scale.py); ``max_ratio`` times that is a typo-sized
    mistake (a weight off by orders of magnitude).
    """

    priority = 'VERY_LOW'

    def __init__(self, max_ratio: float = 100.0, first_iters: int = 1):
        self.max_ratio, self.first_iters = max_ratio, first_iters

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if runner.iter >= self.first_iters or not outputs:
            return
        distill = sum(float(v) for k, v in outputs.items() if k.startswith('loss_distill'))
        det = sum(float(v) for k, v in outputs.items() if k.startswith('loss_') and not k.startswith('loss_distill'))
        if distill and det and distill > self.max_ratio * det:
            print_log(
                f'WARNING: the distillation terms are {distill / det:.3g}x the detection loss at '
                f'iteration {runner.iter + 1} ({distill:.4g} vs {det:.4g}); the calibrated weights give '
                f'about 1x (benchmarks/loss_scale.py): check the loss_weight values',
                logger='current',
                level=30,
            )


def reset_module(module: nn.Module) -> None:
    """Re-initialise every layer of ``module`` that knows how (PyTorch's default init)."""
    for layer in module.modules():
        if layer is not module and hasattr(layer, 'reset_parameters'):
            layer.reset_parameters()
    for name, param in module.named_parameters(recurse=False):
        if name == 'fusion_logits':
            nn.init.zeros_(param)


@HOOKS.register_module()
class SALHandoff(Hook):
    """At the first iteration of SAL stage k+1 (resumed from stage k's state, new teacher):

    * optimizer state whose shape no longer fits its parameter (loss modules of another
      width, which mmengine's resume left at their fresh init) is dropped;
    * with ``reset_modules``, every distillation loss module is re-initialised (seeded by
      the run seed) and its optimizer state dropped: the ablation of carrying them over.
    """

    priority = 'VERY_HIGH'

    def __init__(self, boundary: int, reset_modules: bool = False, seed: int = 0):
        self.boundary, self.reset_modules, self.seed = boundary, reset_modules, seed

    def before_train(self, runner) -> None:
        if runner.iter != self.boundary:  # resuming an interrupted stage k+1: nothing to hand over
            return
        model = runner.model.module if hasattr(runner.model, 'module') else runner.model
        optimizer = runner.optim_wrapper.optimizer
        dropped = 0
        for param in model.parameters():
            state = optimizer.state.get(param)
            if state and any(torch.is_tensor(v) and v.dim() and v.shape != param.shape for v in state.values()):
                del optimizer.state[param]
                dropped += 1
        if self.reset_modules:
            with torch.random.fork_rng():
                torch.manual_seed(self.seed)
                for modules in model.losses.values():
                    for module in modules:
                        reset_module(module)
                        for param in module.parameters():
                            dropped += optimizer.state.pop(param, None) is not None
        print_log(
            f'SAL hand-off at iteration {self.boundary}: loss modules '
            f'{"re-initialised" if self.reset_modules else "carried over"}, optimizer state and '
            f'learning-rate schedule continued ({dropped} parameter states dropped)',
            logger='current',
        )
