"""Peak memory of a stage: host RSS sampled in a thread, plus CUDA's own peak counter."""

from __future__ import annotations

import threading
from types import TracebackType

import psutil


class PeakMemory:
    """Context manager measuring peak resident memory (MB) while the block runs."""

    def __init__(self, interval_s: float = 0.1) -> None:
        self.interval_s = interval_s
        self.peak_rss_mb = 0.0
        self.peak_gpu_mb: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._process = psutil.Process()

    def _read(self) -> None:
        self.peak_rss_mb = max(self.peak_rss_mb, self._process.memory_info().rss / 2**20)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._read()

    def __enter__(self) -> PeakMemory:
        self._read()
        if _cuda_ready():
            import torch

            torch.cuda.reset_peak_memory_stats()
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        self._read()
        if _cuda_ready():
            import torch

            self.peak_gpu_mb = torch.cuda.max_memory_allocated() / 2**20

    def as_metrics(self, prefix: str) -> dict[str, float | None]:
        return {
            f"{prefix}_peak_rss_mb": self.peak_rss_mb,
            f"{prefix}_peak_gpu_mb": self.peak_gpu_mb,
        }


def _cuda_ready() -> bool:
    """True only when torch is already imported and sees a GPU (never imports torch itself)."""
    import sys

    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_available())
