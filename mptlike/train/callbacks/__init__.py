"""Lightning callbacks: throughput/MFU metrics and the console progress display."""

from mptlike.train.callbacks.progress import ProgressDisplay
from mptlike.train.callbacks.throughput import ThroughputMonitor

__all__ = ["ProgressDisplay", "ThroughputMonitor"]
