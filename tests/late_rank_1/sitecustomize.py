"""Imported at start-up by every Python process that has this folder on PYTHONPATH
(tests/test_distributed.py): torchrun's rank 1 ends each test epoch 2 s after rank 0, so that
whatever rank 0 removes after predicting is removed before rank 1's last writes."""

import os

if os.environ.get('RANK') == '1':
    import sys
    import time

    from mmengine.hooks import LoggerHook

    after_test_epoch = LoggerHook.after_test_epoch

    def late_after_test_epoch(self, runner, metrics=None):
        print('[late_rank_1] rank 1 ends its test epoch 2 s late', file=sys.stderr, flush=True)
        time.sleep(2)
        after_test_epoch(self, runner, metrics)

    LoggerHook.after_test_epoch = late_after_test_epoch
