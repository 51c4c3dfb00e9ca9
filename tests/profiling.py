"""Tensor-memory peaks measured with `torch.profiler`, for the memory tests."""

from __future__ import annotations

from typing import Any


def tensor_peak(session: Any) -> int:
    """Peak of the running sum of the CPU allocator's allocation / free events of one profiler session
    (`torch.profiler.profile(..., profile_memory=True)`), in bytes above what existed when it started."""
    events = sorted(
        (e for e in session.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    running = peak = 0
    for event in events:
        running += event.nbytes()
        peak = max(peak, running)
    return peak
