"""The recipe file's schema: what a pipeline run may say, checked before anything runs.

Every model forbids unknown keys, so a typo is an error pointing at its line rather than a
silently ignored option. Values are checked against the same tables the commands use
(kiln.compress.llama_quant's quant types, the ONNX precisions, the rope parser), so a recipe
that validates cannot fail later on an option a command would have refused.
Paths are checked for existence in kiln.recipe.load, which knows where the file lives.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

HUB_ID = re.compile(r"^(hf:)?[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w./-]+)?$")
NAME = re.compile(r"^[A-Za-z0-9][\w.-]*$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _quant(name: str) -> str:
    """The canonical name, through the one parser every --quant goes through (kiln.compress.llama_quant)."""
    from kiln.compress.llama_quant import quant_type
    from kiln.errors import KilnError

    try:
        return quant_type(name).name
    except KilnError as exc:
        raise ValueError(str(exc)) from None


def _unique(values: list[str]) -> list[str]:
    seen = [v for i, v in enumerate(values) if v in values[:i]]
    if seen:
        raise ValueError(f"{seen[0]!r} is listed twice")
    return values


QuantName = Annotated[str, AfterValidator(_quant)]
GGUFTypes = Annotated[list[QuantName], AfterValidator(_unique)]


class Rope(Strict):
    """RoPE / context settings baked into every export (`kiln export --rope-scaling ...`)."""

    scaling: Literal["none", "linear", "yarn"] | None = None  # None: as the checkpoint's config.json says
    factor: float | None = Field(default=None, ge=1)
    original_context: int | None = Field(default=None, gt=0)
    context: int | None = Field(default=None, gt=0)
    allow_shorter_context: bool = False

    @model_validator(mode="after")
    def _factor(self) -> Rope:
        if self.scaling in ("linear", "yarn") and self.factor is None:
            raise ValueError(f"rope scaling {self.scaling!r} needs a factor (e.g. factor: 4)")
        if self.scaling in (None, "none") and self.factor is not None:
            raise ValueError("factor needs scaling: linear or yarn")
        if self.original_context is not None and self.scaling is None:
            raise ValueError("original_context needs scaling: linear or yarn")
        return self

    def flag(self) -> str | None:
        """The `--rope-scaling` string of kiln.checkpoint.rope.parse_scaling."""
        if self.scaling is None:
            return None
        return "none" if self.scaling == "none" else f"{self.scaling}:{self.factor:g}"


class GPTQ(Strict):
    """Calibrated GPTQ into a checkpoint, then exported (`kiln quantize gptq` + `kiln export`)."""

    bits: Literal[4, 8] = 4
    group_size: Literal[32, 64, 128] = 32
    sym: bool = True
    act_order: bool = False
    damp: float = Field(default=0.01, gt=0, lt=1)
    scale_search: bool = True  # importance-weighted choice of each group's scale (kiln quantize gptq --scale-search)
    samples: int = Field(default=128, gt=0)
    seq_len: int = Field(default=512, ge=16)
    gguf: GGUFTypes = Field(default_factory=list)  # GGUF types of the GPTQ checkpoint (q4_0/q4_1/q8_0: bit-exact)
    onnx: bool = False  # ONNX of the GPTQ checkpoint at int{bits} (its codes go into MatMulNBits as they are)


class Targets(Strict):
    gguf: GGUFTypes = Field(default_factory=list)
    modelfile: bool = False  # an Ollama Modelfile beside every GGUF
    onnx: Annotated[list[Literal["fp32", "int8", "int4"]], AfterValidator(_unique)] = Field(default_factory=list)
    gptq: GPTQ | None = None

    @model_validator(mode="after")
    def _something(self) -> Targets:
        if not (self.gguf or self.onnx or (self.gptq and (self.gptq.gguf or self.gptq.onnx))):
            raise ValueError("nothing to export (give gguf, onnx, or gptq with gguf/onnx)")
        return self


class Eval(Strict):
    """Quality against a reference on held-out text (`kiln eval`)."""

    enabled: bool = True
    text: str | None = None  # default: the held-out text kiln ships
    ctx: int = Field(default=512, ge=16)
    reference: str = "source"  # or a target's step id, e.g. gguf-f16 (for sources transformers cannot run)


class Bench(Strict):
    """Cost on this machine (`kiln bench`): the grid of configurations measured for every artifact."""

    enabled: bool = True
    contexts: list[int] = Field(default_factory=lambda: [512], min_length=1)
    threads: int = Field(default=2, gt=0)
    particles: list[int] = Field(default_factory=lambda: [1], min_length=1)
    kv_types: list[str] = Field(default_factory=lambda: ["f16"], min_length=1)
    flash_attn: list[Literal["on", "off"]] = Field(default_factory=lambda: ["off"], min_length=1)
    anchors: bool = True

    @field_validator("contexts", "particles")
    @classmethod
    def _positive(cls, v: list[int], info) -> list[int]:
        least = 64 if info.field_name == "contexts" else 1
        bad = [x for x in v if x < least]
        if bad:
            raise ValueError(f"must be at least {least}, got {bad[0]}")
        return v


class SourceOptions(Strict):
    """For checkpoints that carry less than a Hugging Face directory: native Arbor, nanoGPT (`kiln export`'s
    source options)."""

    allow_pickle: bool = False
    n_heads: int | None = Field(default=None, gt=0)
    tokenizer: str | None = None


class Recipe(Strict):
    """One pipeline: a source, optional LoRA merge, rope settings, targets, calibration/eval texts, bench grid."""

    name: str
    source: str  # a directory, fixture:NAME, or a hub id ORG/NAME (hf:ORG/NAME[/FILE])
    source_options: SourceOptions = SourceOptions()
    lora: str | None = None  # a PEFT adapter directory merged into the source first
    rope: Rope = Rope()
    targets: Targets
    calibration: str | None = None  # GPTQ calibration text (default: the one kiln ships)
    eval: Eval = Eval()
    bench: Bench = Bench()
    verify: bool = True  # every export checks its logits against its source
    threads: int = Field(default=0, ge=0)  # for quantizing, verifying and evaluating (0: all)
    executor: Literal["local", "ray"] | None = None  # how `kiln recipe run` runs it (--executor overrides)
    output: str

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME.match(v):
            raise ValueError(f"{v!r}: use letters, digits, '.', '_' and '-' (it names the artifacts)")
        return v
