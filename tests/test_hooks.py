"""DivergenceGuard's rule on mixed precision (the GPU path): a skipped fp16 step is not divergence."""

from types import SimpleNamespace

import pytest
from mmengine.logging import MessageHub
from mmengine.optim import AmpOptimWrapper, OptimWrapper

from dfmsd.core.errors import TrainingDiverged
from dfmsd.models.hooks import DivergenceGuard

pytestmark = pytest.mark.fast


def steps(wrapper, losses, grads):
    hub = MessageHub.get_instance(f'guard-{id(wrapper)}')
    runner = SimpleNamespace(message_hub=hub, optim_wrapper=wrapper, iter=0)
    guard = DivergenceGuard(patience=3)
    for i, (loss, grad) in enumerate(zip(losses, grads)):
        runner.iter = i
        hub.update_scalar('train/grad_norm', grad)
        guard.after_train_iter(runner, i, outputs={'loss': loss})


def test_an_infinite_gradient_norm_stops_plain_training_after_patience():
    plain = object.__new__(OptimWrapper)
    steps(plain, [1.0] * 2, [float('inf')] * 2)  # two in a row: still running
    with pytest.raises(TrainingDiverged, match='3 consecutive iterations'):
        steps(plain, [1.0] * 3, [float('inf')] * 3)


def test_mixed_precision_skips_inf_gradients_but_not_a_nan_loss():
    amp = object.__new__(AmpOptimWrapper)  # the real class; its __init__ needs a GPU
    steps(amp, [1.0] * 5, [float('inf')] * 5)  # the loss scaler's skipped steps
    with pytest.raises(TrainingDiverged):
        steps(amp, [float('nan')] * 3, [1.0] * 3)
