"""The weight types `edgellm quantize` and `edgellm convert` make, by the names llama.cpp uses."""

from __future__ import annotations

from dataclasses import dataclass

import gguf

from edgellm.errors import ValidationError


@dataclass(frozen=True, slots=True)
class QuantType:
    name: str  # llama.cpp's name, e.g. "Q4_K_M"
    ftype: int  # llama_ftype: what llama_model_quantize is asked for, general.file_type after
    needs_imatrix: bool  # IQ types: only made with an importance matrix


_QUANTIZED = [
    *("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0"),
    *("Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K"),
    *("IQ4_XS", "IQ4_NL", "IQ3_M", "IQ3_S", "IQ3_XXS", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS"),
    *("IQ1_M", "IQ1_S"),
]
QUANT_TYPES: dict[str, QuantType] = {
    name: QuantType(
        name, int(gguf.LlamaFileType[f"MOSTLY_{name}"]), needs_imatrix=name.startswith("IQ")
    )
    for name in _QUANTIZED
}
# Unquantized formats `convert` writes: name -> (llama_ftype, tensor type of the big tensors).
FLOAT_TYPES: dict[str, tuple[int, gguf.GGMLQuantizationType]] = {
    "f32": (int(gguf.LlamaFileType.ALL_F32), gguf.GGMLQuantizationType.F32),
    "f16": (int(gguf.LlamaFileType.MOSTLY_F16), gguf.GGMLQuantizationType.F16),
    "bf16": (int(gguf.LlamaFileType.MOSTLY_BF16), gguf.GGMLQuantizationType.BF16),
}
UNQUANTIZED = {
    gguf.GGMLQuantizationType.F32,
    gguf.GGMLQuantizationType.F16,
    gguf.GGMLQuantizationType.BF16,
    gguf.GGMLQuantizationType.F64,
}


def quant_type(name: str, *, param: str = "type") -> QuantType:
    """The type called `name` (any case), or a ValidationError listing the known ones."""
    found = QUANT_TYPES.get(name.strip().upper())
    if found is None:
        known = ", ".join(QUANT_TYPES)
        raise ValidationError(f"unknown quantization type {name!r}; known: {known}", param=param)
    return found
