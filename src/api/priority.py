"""CPU priority of the server's worker threads.

On a machine with fewer cores than busy workers (2 cores: the event loop, two embedding
workers, two language models, the classifier, the reward model), the operating system
shares the cores evenly between them, so a one-line search query waits for a share of the
CPU behind a classification batch or a chat completion. The workers of latency-critical work
(the retrieval path: query embeddings, search, ``/query``'s answer) keep the normal
priority; the others run at a higher *niceness* (Linux lets any thread lower its own
priority; nothing here needs privileges), so they get the CPU that is left, not a share
taken from the queries. They still get CPU time on a busy machine (a niceness of 10 has
about a tenth of the weight of 0), and all of it on an idle one.
"""

from __future__ import annotations

import os
import threading

from src.core.logging import get_logger

log = get_logger("api")
_warned = False


def lower_thread_priority(nice: int) -> int:
    """Set the calling thread's niceness to ``nice`` (0: leave it) and return the niceness it
    runs at. Where threads cannot have their own (not Linux), logs once and runs on."""
    global _warned
    if nice <= 0:
        return 0
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid), nice))
        return os.getpriority(os.PRIO_PROCESS, tid)
    except (AttributeError, OSError) as err:
        if not _warned:
            _warned = True
            log.warning("background workers run at normal priority (thread niceness not available: %s)", err)
        return 0
