"""The device catalog: `devices.toml` shipped with edgellm, plus the user's own file."""

from __future__ import annotations

import difflib
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from edgellm.errors import ValidationError

KINDS = ("cpu", "soc", "gpu")


@dataclass(frozen=True, slots=True)
class Device:
    key: str  # catalog key, e.g. "jetson-orin-nano-8gb"
    name: str  # what people call it
    kind: str  # cpu | soc | gpu
    memory_gib: float  # memory the model lives in
    usable_fraction: float  # share of it one model may use (the OS, driver keep the rest)
    bandwidth_gbs: float  # peak memory bandwidth, 1e9 bytes/s
    f16_tflops: float  # dense FP16 peak
    int8_tops: float  # dense INT8 peak
    power_w: float  # typical maximum power
    source: str  # where the numbers come from
    measured: bool = False  # numbers measured on the machine itself (plan --here)

    @property
    def usable_bytes(self) -> float:
        return self.memory_gib * 2**30 * self.usable_fraction


def load_catalog(extra: Path | None = None) -> dict[str, Device]:
    text = resources.files("edgellm.plan").joinpath("devices.toml").read_text()
    devices = _parse(tomllib.loads(text), "devices.toml")
    if extra is not None:
        try:
            data = tomllib.loads(extra.read_text())
        except FileNotFoundError:
            raise ValidationError(f"catalog file not found: {extra}", param="catalog") from None
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ValidationError(f"cannot read {extra}: {exc}", param="catalog") from exc
        devices |= _parse(data, str(extra))
    return devices


def find_device(catalog: dict[str, Device], name: str) -> Device:
    """The device called `name` (its key, any case); else an error suggesting close names."""
    key = name.strip().lower()
    if key in catalog:
        return catalog[key]
    close = difflib.get_close_matches(key, list(catalog), n=3, cutoff=0.4)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValidationError(
        f"unknown device {name!r}{hint} (`edgellm plan --list-devices` lists them)",
        param="device",
    )


def _parse(data: dict[str, Any], origin: str) -> dict[str, Device]:
    devices = {}
    for key, entry in data.get("devices", {}).items():
        try:
            device = Device(key=key.lower(), **entry)
            if device.kind not in KINDS:
                raise ValueError(f"kind must be one of {', '.join(KINDS)}")
            numbers = (device.memory_gib, device.bandwidth_gbs, device.usable_fraction)
            if min(numbers) <= 0 or device.usable_fraction > 1:
                raise ValueError("memory, bandwidth and usable_fraction (<= 1) must be positive")
        except (TypeError, ValueError) as exc:
            raise ValidationError(f"{origin}: device {key!r}: {exc}", param="catalog") from exc
        devices[device.key] = device
    return devices
