"""A lost GPU ends the process, so the orchestrator starts a fresh one.

After a sticky CUDA error (illegal address, launch failure, uncorrectable ECC:
``engines.errors.DeviceLost``) every CUDA call of this process fails until it
exits. ``device_lost`` logs one critical line saying why, then sends this
process SIGTERM: the server's drain takes it out of readiness (503), answers
what is queued (those requests fail fast with 503) and exits, and Kubernetes
restarts the container. Other errors stay with their request.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

from engines.errors import DeviceLost

log = logging.getLogger("kiln.device")

_reported = threading.Event()


def device_lost(error: DeviceLost) -> None:
    """Leave readiness and exit (once per process, whichever request saw it first)."""
    if _reported.is_set():
        return
    _reported.set()
    log.critical(
        "the GPU is unusable for this process (%s); leaving readiness and exiting so it is restarted",
        error.message,
    )
    os.kill(os.getpid(), signal.SIGTERM)
