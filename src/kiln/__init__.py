"""kiln: compress small causal LMs, bake their RoPE/context settings, export GGUF/ONNX, verified."""

__version__ = "0.1.0"
