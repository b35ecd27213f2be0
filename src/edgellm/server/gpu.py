"""GPU gauges through NVML (`nvidia-ml-py`, the `gpu` extra), read when Prometheus scrapes.

No NVIDIA GPU, no driver, or no `pynvml` module: no collector and no series, never an error. A
device that stops answering mid-life loses its series for that scrape only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("edgellm.server")

GPU_SERIES = (
    "edgellm_gpu_utilization_ratio",
    "edgellm_gpu_memory_used_bytes",
    "edgellm_gpu_memory_total_bytes",
    "edgellm_gpu_temperature_celsius",
)


class GpuGauges(Collector):
    """One sample per NVIDIA device and gauge, labelled by its index and name."""

    def __init__(self, nvml: ModuleType, handles: list[Any]):
        self.nvml = nvml
        self.handles = handles

    @classmethod
    def open(cls) -> GpuGauges | None:
        """The collector of this machine's NVIDIA GPUs; None when there are none."""
        try:
            import pynvml  # type: ignore[import-untyped]
        except ImportError:
            return None
        try:
            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        except pynvml.NVMLError as exc:  # no driver, no device: a CPU box
            log.debug("no NVIDIA GPU metrics: %s", exc)
            return None
        return cls(pynvml, handles) if handles else None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["gpu", "name"]
        utilization, used, total, temperature = (
            GaugeMetricFamily(name, doc, labels=labels)
            for name, doc in zip(
                GPU_SERIES,
                (
                    "Share of the last sample period a kernel ran on the GPU (0-1).",
                    "GPU memory in use, all processes.",
                    "GPU memory in all.",
                    "GPU core temperature.",
                ),
                strict=True,
            )
        )
        nvml = self.nvml
        for index, handle in enumerate(self.handles):
            try:
                name = nvml.nvmlDeviceGetName(handle)
                rates = nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                celsius = nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)
            except nvml.NVMLError as exc:
                log.warning("GPU %d did not answer NVML: %s", index, exc)
                continue
            name = name.decode() if isinstance(name, bytes) else str(name)
            values = [str(index), name]
            utilization.add_metric(values, rates.gpu / 100)
            used.add_metric(values, memory.used)
            total.add_metric(values, memory.total)
            temperature.add_metric(values, celsius)
        yield from (utilization, used, total, temperature)
