"""Reading checkpoints: config, tokenizer and lazily streamed tensors, validated up front."""

from kiln.checkpoint.reader import Checkpoint, load_checkpoint, source_hash
from kiln.checkpoint.rope import RopeSettings
from kiln.checkpoint.spec import ModelSpec, TokenizerSpec

__all__ = ["Checkpoint", "ModelSpec", "RopeSettings", "TokenizerSpec", "load_checkpoint", "source_hash"]
