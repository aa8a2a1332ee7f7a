"""DFMSD: dual feature masking stage-wise knowledge distillation on MMDetection."""
