"""Write test GGUFs: a copy of a model with some string metadata replaced, or a broken file."""

from __future__ import annotations

from pathlib import Path

import gguf


def copy_with_metadata(src: Path, dst: Path, strings: dict[str, str]) -> Path:
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch)
    for fld in reader.fields.values():
        if fld.name == "general.architecture" or fld.name.startswith("GGUF."):
            continue
        if fld.name in strings:
            continue
        vtype = fld.types[0]
        sub_type = fld.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(fld.name, fld.contents(), vtype, sub_type=sub_type)
    for key, value in strings.items():
        writer.add_key_value(key, value, gguf.GGUFValueType.STRING)
    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(t.data)
    writer.close()
    return dst


def truncated_copy(src: Path, dst: Path, keep_bytes: int) -> Path:
    with src.open("rb") as f:
        dst.write_bytes(f.read(keep_bytes))
    return dst
