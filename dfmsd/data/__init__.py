"""Datasets: the synthetic generator, COCO-format checks and masking enhancement (numpy, PIL)."""
