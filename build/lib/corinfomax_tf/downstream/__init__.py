"""Downstream tasks on a pretrained encoder: semi-supervised fine-tuning, detection."""
