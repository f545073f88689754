"""Artifact formats: one registered class per format kiln writes and runs (base.py says what each answers).

================  ==========================================  ==============  ========================
format            detected by                                 engine          manifest
================  ==========================================  ==============  ========================
gguf (gguf.py)    a file named *.gguf, or starting with GGUF  llama.cpp       NAME.gguf.manifest.json
onnx (onnx.py)    a directory holding genai_config.json       onnxruntime     DIR/manifest.json
================  ==========================================  ==============  ========================

`format_of(path)` is the one place that decides "is this a GGUF file or an ONNX directory";
callers ask the format for the rest. Nothing here imports torch or an engine library at import
time (the runtime, which embeds without torch, dispatches through this package).
"""

from __future__ import annotations

from kiln.formats.base import Format, by_name, format_of, formats, open_engine, register, require_format
from kiln.formats.gguf import GGUF
from kiln.formats.onnx import ONNX

__all__ = ["GGUF", "ONNX", "Format", "by_name", "format_of", "formats", "open_engine", "register",
           "require_format"]
