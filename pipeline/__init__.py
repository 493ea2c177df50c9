"""kdpipe: offline knowledge distillation for image classifiers with cached teacher logits."""

__version__ = "0.1.0"
