"""What the engine did since it started, counted as it happens (for the metrics endpoint).

The journal says what is true now (a file that shrank has fewer uploaded bytes than
before); these counts only ever go up, as Prometheus counters must, and restart at 0
with the process. Upload times are kept as a histogram with fixed bucket bounds.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
"""Upper bounds, in seconds, of the upload-time histogram (a tiny file to a large one)."""


@dataclass
class WatchTally:
    files_uploaded: int = 0
    bytes_uploaded: int = 0
    files_failed: int = 0
    retries: int = 0
    throttled: int = 0
    last_upload_at: float | None = None
    """Wall-clock time of the latest upload of the watch."""
    duration_counts: list[int] = field(default_factory=lambda: [0] * len(DURATION_BUCKETS))
    """Uploads that took at most each bound (not cumulative; the last bucket is +Inf)."""
    duration_over: int = 0
    duration_sum: float = 0.0


class Tally:
    """Per-watch counts of uploads, failures, retries and throttled requests."""

    def __init__(self) -> None:
        self.watches: dict[str, WatchTally] = {}

    def _of(self, watch: str) -> WatchTally:
        tally = self.watches.get(watch)
        if tally is None:
            tally = self.watches[watch] = WatchTally()
        return tally

    def uploaded(self, watch: str, size: int, seconds: float, at: float) -> None:
        tally = self._of(watch)
        tally.files_uploaded += 1
        tally.bytes_uploaded += size
        tally.last_upload_at = at
        tally.duration_sum += seconds
        index = bisect.bisect_left(DURATION_BUCKETS, seconds)
        if index < len(DURATION_BUCKETS):
            tally.duration_counts[index] += 1
        else:
            tally.duration_over += 1

    def failed(self, watch: str) -> None:
        self._of(watch).files_failed += 1

    def retried(self, watch: str) -> None:
        self._of(watch).retries += 1

    def throttled(self, watch: str) -> None:
        self._of(watch).throttled += 1
