"""Reading checkpoints, aligning them, writing merged models."""

from .checkpoint import Checkpoint, TensorInfo, open_checkpoint

__all__ = ["Checkpoint", "TensorInfo", "open_checkpoint"]
