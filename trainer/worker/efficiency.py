"""How well a rank uses its accelerator: model FLOPs, MFU, and the GPU's own counters.

MFU (model FLOPs utilisation) = the model FLOPs a rank computes per second over
the device's dense peak. The FLOPs of one optimizer step are counted once, on
the first step of an attempt, by `torch.utils.flop_counter.FlopCounterMode`
around its forward and backward passes: the real batch shapes, on the device in
use, with this rank's share of the work (under DDP and FSDP every rank computes
its own micro-batches; FSDP only shards parameters). A task with variable batch
shapes (dynamic padding) gets the first step's count for every step.

Peaks come from PEAKS below by `torch.cuda.get_device_name` and precision, or
from `metrics.peakFlops`; where neither knows one (a CPU, an unlisted GPU) MFU is
not reported rather than guessed. GPU utilisation and power come from NVML when
`nvidia-ml-py` is installed (an optional dependency, absent on CPU images).
"""

from __future__ import annotations

import contextlib
import logging
import re

import torch

log = logging.getLogger(__name__)

# Dense (no sparsity) peak FLOP/s per GPU from the vendor's datasheets, by precision. The first pattern
# that matches the device name wins, so variants come before their family ("H100 PCIe" before "H100");
# the word boundaries keep "A10" from matching an A10G or an A100.
PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    (r"\bH100\b.*\bPCIe\b", {"bf16": 756.5e12, "fp16": 756.5e12, "tf32": 378e12, "fp32": 51.2e12}),
    (r"\bH[12]00\b.*\bNVL\b", {"bf16": 835.5e12, "fp16": 835.5e12, "tf32": 417.5e12, "fp32": 60e12}),
    (r"\bG?H[12]00\b", {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}),  # SXM
    (r"\bA100\b", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    (r"\bL40S\b", {"bf16": 362.05e12, "fp16": 362.05e12, "tf32": 183.2e12, "fp32": 91.6e12}),
    (r"\bL40\b", {"bf16": 181.05e12, "fp16": 181.05e12, "tf32": 90.5e12, "fp32": 90.5e12}),
    (r"\bL4\b", {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12}),
    (r"\bA10\b", {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12}),
)


def table_peak(device_name: str, precision: str) -> float | None:
    """The dense peak FLOP/s of a named device at `precision` (bf16, fp16, tf32 or fp32); None if unknown."""
    for pattern, peaks in PEAKS:
        if re.search(pattern, device_name):
            return peaks.get(precision)
    return None


def matmul_precision(precision: str) -> str:
    """What the matrix units run for training.precision: fp32 runs as tf32 where PyTorch allows it."""
    if precision in ("bf16", "fp16"):
        return precision
    return "tf32" if torch.get_float32_matmul_precision() != "highest" else "fp32"


class Efficiency:
    """One rank's FLOPs per step, the peak it is measured against, and its NVML handle."""

    def __init__(self, device: torch.device, precision: str, peak_override: float | None = None):
        self.device = device
        self.flops_per_step: float | None = None  # set by the first step (count())
        self.peak, self.peak_source = self._peak(device, precision, peak_override)
        self.nvml = _nvml_handle(device) if device.type == "cuda" else None

    @staticmethod
    def _peak(device: torch.device, precision: str, override: float | None) -> tuple[float | None, str]:
        if override:
            return float(override), "metrics.peakFlops"
        if device.type != "cuda":
            return None, f"no peak FLOP/s is known for the {device.type} device; set metrics.peakFlops to report it"
        name, kind = torch.cuda.get_device_name(device), matmul_precision(precision)
        peak = table_peak(name, kind)
        if peak is None:
            return None, f"no {kind} peak FLOP/s is known for {name}; set metrics.peakFlops to report it"
        return peak, f"the {kind} dense peak of {name}"

    def describe(self) -> str:
        """One log line on what MFU is measured against, or why it is not reported."""
        if self.peak is None:
            return f"MFU: not reported: {self.peak_source}"
        return f"MFU: against {self.peak:.4g} FLOP/s ({self.peak_source})"

    @contextlib.contextmanager
    def count(self, micro_batches: int, samples: int, announce: bool):
        """Count the FLOPs of the block (a step's forward and backward passes) once, the first time."""
        if self.flops_per_step is not None:
            yield
            return
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            yield
        self.flops_per_step = float(counter.get_total_flops())
        if announce:
            log.info("model FLOPs per step: %.4g per rank, %.4g per sample (measured with FlopCounterMode on "
                     "the first step: forward and backward of %d micro-batch%s)", self.flops_per_step,
                     self.flops_per_step / max(samples, 1), micro_batches, "" if micro_batches == 1 else "es")

    def mfu(self, steps_per_second: float) -> float | None:
        """Achieved model FLOP/s of this rank over the peak; None without a peak or a count."""
        if not (self.peak and self.flops_per_step):
            return None
        return self.flops_per_step * steps_per_second / self.peak

    def gpu_stats(self) -> dict[str, float]:
        """This rank's GPU memory (torch) and, with nvidia-ml-py, utilisation and power (NVML); {} off CUDA."""
        if self.device.type != "cuda":
            return {}
        stats = {"allocated": torch.cuda.memory_allocated(self.device),
                 "reserved": torch.cuda.memory_reserved(self.device),
                 "peak": torch.cuda.max_memory_allocated(self.device)}
        if self.nvml is not None:
            pynvml, handle = self.nvml
            try:
                stats["utilization"] = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0
                stats["power_watts"] = pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0  # milliwatts
            except pynvml.NVMLError as e:  # a counter this GPU or driver lacks: keep the rest
                log.debug("nvml: %s", e)
        return stats


def _nvml_handle(device: torch.device):
    """(pynvml, the NVML handle of this torch device) or None where nvidia-ml-py or NVML is missing.

    NVML numbers GPUs regardless of CUDA_VISIBLE_DEVICES, so the device is found by its PCI bus id.
    """
    try:
        import pynvml  # from nvidia-ml-py: optional, absent on CPU images
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        props = torch.cuda.get_device_properties(device)
        bus_id = f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"
        return pynvml, pynvml.nvmlDeviceGetHandleByPciBusId(bus_id)
    except (pynvml.NVMLError, AttributeError) as e:
        log.info("nvml: no GPU utilisation or power metrics: %s", e)
        return None
