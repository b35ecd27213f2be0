"""GPU gauges (edgellm.server.gpu): absent without an NVIDIA GPU, no error; with one, one
sample per device and gauge. No GPU here: the device side is a scripted NVML module (the one
seam), the absent side the real `pynvml` on this machine."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from edgellm.server.gpu import GPU_SERIES, GpuGauges
from edgellm.server.lifecycle import ModelTable
from edgellm.server.metrics import Metrics


class _NvmlError(Exception):
    pass


def _scripted_nvml(broken: set[int]) -> Any:
    """Two devices; the ones in `broken` fail every query, as a device that fell off the bus."""

    def query(value: Any) -> Any:
        def call(handle: int, *_: Any) -> Any:
            if handle in broken:
                raise _NvmlError("GPU is lost")
            return value(handle)

        return call

    return SimpleNamespace(
        NVMLError=_NvmlError,
        NVML_TEMPERATURE_GPU=0,
        nvmlDeviceGetName=query(lambda h: f"NVIDIA H200 #{h}".encode()),
        nvmlDeviceGetUtilizationRates=query(lambda h: SimpleNamespace(gpu=40 + h)),
        nvmlDeviceGetMemoryInfo=query(lambda h: SimpleNamespace(used=(h + 1) << 30, total=8 << 30)),
        nvmlDeviceGetTemperature=query(lambda h: 60 + h),
    )


def _samples(collector: GpuGauges) -> dict[tuple[str, str], float]:
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {
        (s.name, s.labels["gpu"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_each_device_has_its_gauges() -> None:
    samples = _samples(GpuGauges(_scripted_nvml(set()), [0, 1]))
    assert samples[("edgellm_gpu_utilization_ratio", "1")] == 0.41
    assert samples[("edgellm_gpu_memory_used_bytes", "0")] == 1 << 30
    assert samples[("edgellm_gpu_memory_total_bytes", "1")] == 8 << 30
    assert samples[("edgellm_gpu_temperature_celsius", "1")] == 61
    assert {name for name, _ in samples} == set(GPU_SERIES)


def test_a_device_that_stops_answering_loses_its_samples_only() -> None:
    samples = _samples(GpuGauges(_scripted_nvml({0}), [0, 1]))
    assert {gpu for _, gpu in samples} == {"1"}


def test_this_machine_has_gpu_series_exactly_when_it_has_a_gpu() -> None:
    """With the real pynvml: on a machine without an NVIDIA driver (CI's), no series and no
    error; on one with a GPU, every series."""
    here = GpuGauges.open()
    text = Metrics(ModelTable([])).exposition().decode()
    if here is None:
        assert "edgellm_gpu_" not in text
    else:
        assert all(name in text for name in GPU_SERIES)
