"""Rank 0's Prometheus metrics, and the numbers derived for them (MFU, memory)."""

from __future__ import annotations

import resource
import sys
from typing import Any, Final

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

# Dense bf16 peak FLOP/s by GPU product, for MFU (vendor datasheets, no sparsity).
PEAK_BF16_FLOPS: Final = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10": 125e12,
}


def peak_flops() -> float | None:
    """Peak bf16 FLOP/s of this process' GPU, or None (CPU, or an unknown GPU)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for product, flops in PEAK_BF16_FLOPS.items():
        if product in name:
            return flops
    return None


def model_flops_utilization(
    n_params: int, tokens_per_second: float, world_size: int
) -> float | None:
    """Achieved / peak FLOP/s with the usual 6·N FLOPs per trained token (GPU only)."""
    peak = peak_flops()
    if peak is None or tokens_per_second <= 0:
        return None
    return 6.0 * n_params * tokens_per_second / (peak * world_size)


def memory_bytes() -> int:
    """Peak GPU memory allocated on this rank, or the process' peak RSS on CPU."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


class Exporter:
    """Gauges served on ``/metrics`` from rank 0."""

    def __init__(self, job_id: str) -> None:
        self.registry = CollectorRegistry()
        # Not "job": Prometheus reserves that label for the scrape job and would rename ours.
        labels = ["job_id"]
        self._job = job_id
        self.step = Gauge(
            "kubetune_trainer_step", "Last optimizer step", labels, registry=self.registry
        )
        self.total_steps = Gauge(
            "kubetune_trainer_total_steps",
            "Planned optimizer steps",
            labels,
            registry=self.registry,
        )
        self.values = {
            name: Gauge(f"kubetune_trainer_{name}", help_text, labels, registry=self.registry)
            for name, help_text in (
                ("train_loss", "Training loss of the last step"),
                ("learning_rate", "Learning rate of the last step"),
                ("grad_norm", "Gradient norm before clipping"),
                ("tokens_per_second", "Trained tokens per second, all ranks"),
                ("mfu", "Model FLOPs utilization (GPU only)"),
                ("memory_bytes", "Peak memory of rank 0"),
                ("valid_loss", "Last validation loss"),
                ("valid_mean_token_accuracy", "Last validation token accuracy"),
            )
        }
        self.checkpoints = Counter(
            "kubetune_trainer_checkpoints", "Checkpoints committed", labels, registry=self.registry
        )
        self._server: Any = None

    def serve(self, port: int) -> int:
        """Start the HTTP endpoint (port 0: any free port); returns the port."""
        server, _thread = start_http_server(port, registry=self.registry)
        self._server = server
        return int(server.server_port)

    def observe(self, data: dict[str, Any]) -> None:
        """Set the gauges from a metrics event's data."""
        self.step.labels(self._job).set(data["step"])
        if data.get("total_steps") is not None:
            self.total_steps.labels(self._job).set(data["total_steps"])
        for name, gauge in self.values.items():
            if data.get(name) is not None:
                gauge.labels(self._job).set(data[name])

    def close(self) -> None:
        """Stop serving."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
