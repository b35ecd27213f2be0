"""Compression: make a smaller model file from a bigger one, and record how in its manifest.

`convert` dequantizes a GGUF to F16/BF16/F32 (pure Python, `gguf`); `quantize` runs
llama.cpp's own quantizer (through the backend), optionally with an importance matrix computed
here from calibration text (`imatrix`); `sweep` quantizes to several types and evaluates each.
"""
