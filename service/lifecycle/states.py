"""The states of an engine version and the moves between them, defined once.

Every state change goes through ``transition``, checked against ``ALLOWED``; the
registry, the routes, the metrics and the health endpoints ask ``SERVABLE`` and
``SETTLED`` rather than comparing states themselves. A new state (a baseline
engine that serves while an optimized one builds, say) is one enum member, its
row in ``ALLOWED`` and, if it serves, a place in ``SERVABLE``.
"""

from __future__ import annotations

from enum import StrEnum


class VersionState(StrEnum):
    BUILDING = "building"  # queued or building in a child process (or reusing a stored engine)
    LOADING = "loading"  # the engine is loading and warming up in the server
    # Serves on its baseline engine (the upload at FP32 on ONNX Runtime) while its
    # optimized engine builds, loads and warms up; ready once that is swapped in.
    BASELINE = "baseline"
    READY = "ready"  # the requested engine serves
    # Serves, settled, but not what was asked: the requested FP16 or INT8 engine failed
    # and the baseline serves on, or the transform left every op in FP32. ``error``
    # says why.
    FALLBACK = "fallback"
    FAILED = "failed"  # the build or load failed; ``error`` says why
    UNLOADING = "unloading"  # being deleted; gone from the registry once unloaded


ALLOWED: dict[VersionState, frozenset[VersionState]] = {
    VersionState.BUILDING: frozenset(
        {VersionState.BASELINE, VersionState.LOADING, VersionState.FAILED, VersionState.UNLOADING}
    ),
    # BASELINE -> READY: the optimized engine swapped in; -> FALLBACK: it failed and the
    # baseline serves on, or it is not the requested precision (``error`` says why).
    VersionState.BASELINE: frozenset({VersionState.READY, VersionState.FALLBACK, VersionState.UNLOADING}),
    # LOADING -> BUILDING: a stored artifact that passed its checksum but does not
    # load (a plan recorded for another device) is rebuilt once.
    VersionState.LOADING: frozenset(
        {
            VersionState.READY,
            VersionState.FALLBACK,
            VersionState.FAILED,
            VersionState.UNLOADING,
            VersionState.BUILDING,
        }
    ),
    VersionState.READY: frozenset({VersionState.UNLOADING}),
    VersionState.FALLBACK: frozenset({VersionState.UNLOADING}),
    VersionState.FAILED: frozenset({VersionState.UNLOADING}),
    VersionState.UNLOADING: frozenset(),
}

SERVABLE = frozenset({VersionState.BASELINE, VersionState.READY, VersionState.FALLBACK})
"""States in which a version answers requests."""

SETTLED = frozenset({VersionState.READY, VersionState.FALLBACK, VersionState.FAILED})
"""States no background work will move on its own: a version's record is written in
these (and when it is registered), pruning considers only these."""

WORKING = frozenset({VersionState.BUILDING, VersionState.LOADING, VersionState.BASELINE})
"""States in which a build or load task owns the version."""

RECORDED = SETTLED | SERVABLE
"""States in which a version's record is written (and when it is registered): a
restart brings back what was servable."""

RESTORED_AS: dict[VersionState, VersionState | None] = {
    VersionState.READY: VersionState.BUILDING,  # rebuilt if needed, loaded, warmed up
    VersionState.FALLBACK: VersionState.BUILDING,  # the requested engine is tried again
    VersionState.BASELINE: VersionState.BUILDING,  # on its baseline again while it is rebuilt
    VersionState.FAILED: VersionState.FAILED,
    VersionState.BUILDING: VersionState.FAILED,  # interrupted by the restart
    VersionState.LOADING: VersionState.FAILED,
    VersionState.UNLOADING: None,  # its delete was interrupted: finish it
}
"""The state a version recorded in a given state starts in after a restart."""


class IllegalTransition(RuntimeError):
    """A move that ``ALLOWED`` does not list: a bug in the lifecycle code."""


def check_move(current: VersionState, new: VersionState) -> None:
    if new not in ALLOWED[current]:
        raise IllegalTransition(f"a version cannot move from {current} to {new}")
