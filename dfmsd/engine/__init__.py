"""The mmengine/mmdet side: configs, training, checkpoints, evaluation, teachers, launch."""
