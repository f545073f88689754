"""What every artifact format answers, and the registry that picks the format of a path.

An artifact format is what kiln writes and the runtime opens: a GGUF file (llama.cpp) or an ONNX
model directory (onnxruntime). Everything that differs between them (how a path is recognised,
which engine opens it, how the KV cache grows with particles, where the manifest lives, what
`kiln inspect` reads) is a method of the format's class, so no caller tests a suffix or looks for
a file inside a directory itself. Adding a format is one new module with one `@register`ed class.

Imports nothing heavy at module level (no engine library, no torch): the runtime embeds this.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from kiln.errors import KilnError
from kiln.manifest import read_manifest_file

if TYPE_CHECKING:  # the engines are imported only when a format opens one
    from kiln.runtime.engine import Engine


class Format(ABC):
    """One artifact format. Subclasses are registered with `@register` and used as singletons."""

    name: ClassVar[str]  # "gguf", "onnx": what manifests, reports and `kiln inspect` call it
    noun: ClassVar[str]  # "a GGUF file": how a refusal names the format
    hint: ClassVar[str]  # "a .gguf file": what a path of this format looks like
    # True when the engine keeps every sequence in ONE pool of n_ctx cells (llama.cpp's unified KV
    # cache: a shared prompt is stored once, each particle adds only its own tail); False when every
    # sequence is a row with its own n_ctx positions (onnxruntime's batch rows).
    shared_kv_pool: ClassVar[bool]
    # Engine options for measuring an artifact's own fidelity (parity checks, `kiln eval`): settings
    # that would add rounding of their own (a quantized KV cache, flash attention) turned off.
    verification_options: ClassVar[dict[str, Any]] = {}
    # What the parity check must know about how the engine computes (kiln.verify.check):
    # whether it also runs the short prompts as batch rows of one step (a graph that mixes rows fails);
    # whether rope angles drift with position (llama.cpp forms them by repeated f32 multiplication, where
    # transformers uses one multiply; onnxruntime reads tables transformers computed);
    # whether every GELU is the tanh approximation whatever the model says (llama.cpp's gpt2 graph, through
    # an f16 lookup table on CPU), which a reference with exact-erf GELU must allow for.
    verification_rows: ClassVar[bool] = False
    rope_angle_drift: ClassVar[bool] = False
    approximate_gelu: ClassVar[bool] = False
    # KV cache: whether element type and flash attention are engine settings a bench sweeps (llama.cpp),
    # and the multiple the engine rounds a context's cells up to.
    configurable_kv: ClassVar[bool] = False
    kv_cell_multiple: ClassVar[int] = 1

    @abstractmethod
    def detect(self, path: Path) -> bool:
        """Whether `path` (which may not exist) is an artifact of this format."""

    @abstractmethod
    def open_engine(self, path: Path, **options: Any) -> Engine:
        """The kiln engine for this artifact (options: n_ctx, n_seq_max, threads, engine-specific ones)."""

    @abstractmethod
    def preload(self) -> None:
        """Import the engine's native library now (so a memory baseline taken afterwards counts it)."""

    def engine_options(self, kv_type: str | None = None, flash_attn: bool | None = None) -> dict[str, Any]:
        """Engine options for a KV-cache element type and flash attention, where the engine has such
        settings (llama.cpp); a format whose graph fixes them returns {}."""
        return {}

    def engine_sizes(self, prompt_tokens: Sequence[int], particles: int, max_tokens: int) -> dict[str, int]:
        """`n_ctx` and `n_seq_max` to open an engine with for len(prompt_tokens) prompts (each at most
        that many tokens), `particles` sequences per prompt, each growing by up to `max_tokens`."""
        k = len(prompt_tokens)
        if self.shared_kv_pool:  # one pool: every prompt once, then every particle's divergent tail
            n_ctx = sum(prompt_tokens) + k * particles * max_tokens
        else:  # one row per sequence: the longest prompt plus its tail
            n_ctx = max(prompt_tokens, default=0) + max_tokens
        return {"n_ctx": int(n_ctx), "n_seq_max": int(k * particles)}

    @abstractmethod
    def manifest_path(self, path: Path) -> Path:
        """Where kiln's manifest of this artifact lives."""

    def manifest(self, path: Path) -> dict[str, Any] | None:
        """kiln's manifest of the artifact (None when kiln did not write it)."""
        return read_manifest_file(self.manifest_path(path))

    @abstractmethod
    def weights_bytes(self, path: Path) -> int:
        """Bytes on disk of the model itself (graph and weights; not the tokenizer or the manifest)."""

    def tokenizer_json(self, path: Path) -> Path | None:
        """A Hugging Face tokenizer.json shipped with the artifact, or None when the vocabulary lives
        inside the model file (then tokenize through the engine)."""
        return None

    @abstractmethod
    def inspect(self, path: Path) -> dict[str, Any]:
        """What `kiln inspect` shows: architecture, shapes, context, rope, size, bits per weight."""

    def __repr__(self) -> str:
        return f"<kiln format {self.name}>"


_REGISTRY: dict[str, Format] = {}


def register(cls: type[Format]) -> type[Format]:
    """Class decorator: make `cls` one of the formats `format_of` tries (in registration order)."""
    if cls.name in _REGISTRY:
        raise ValueError(f"artifact format {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls()
    return cls


def formats() -> tuple[Format, ...]:
    """Every registered format."""
    return tuple(_REGISTRY.values())


def by_name(name: str) -> Format:
    """The format called `name` ("gguf", "onnx")."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KilnError(f"unknown artifact format {name!r} (known: {', '.join(_REGISTRY)})") from None


def format_of(path: str | Path) -> Format | None:
    """The format of the artifact at `path`, or None (missing path, checkpoint directory, other file)."""
    path = Path(path)
    return next((f for f in _REGISTRY.values() if f.detect(path)), None)


def require_format(path: str | Path, what: str = "artifact") -> Format:
    """`format_of`, or a one-line KilnError naming the path: missing, or of no artifact format."""
    path = Path(path)
    fmt = format_of(path)
    if fmt is not None:
        return fmt
    if not path.exists():
        raise KilnError(f"{path}: no such file or directory")
    known = formats()
    raise KilnError(f"{path}: not {' or '.join(f.noun for f in known)} (the {what} must be "
                    f"{' or '.join(f.hint for f in known)})")


def open_engine(path: str | Path, **options: Any) -> Engine:
    """Open the artifact at `path` with the engine its format needs (`kiln.runtime.load`)."""
    path = Path(path)
    return require_format(path).open_engine(path, **options)
