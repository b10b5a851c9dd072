"""Promote a model version without emptying the index: re-encode the bucket under it, then switch.

``codes`` and ``search`` serve the active version's rows only, so moving the active pointer to a version
that has encoded nothing yet would empty them until the bucket is re-encoded. ``promote`` (the
"re-encode ▶ promote" end of the nightly job; ``hashlake model promote VERSION``) does it in order:

1. Staged reconciler runs for the version (``Reconciler.run_once(version=...)``) queue every object of
   the images bucket that has neither a codes row nor a failure row under it. The intake's batcher
   sends them as batches naming the version, and the workers encode them with that version's model,
   loaded beside the active one. Meanwhile the active version keeps serving queries and live uploads.
   Runs repeat every ``poll_s`` until one finds nothing missing (a lost task is queued again by the
   reconciler's own re-queue rule).
2. The active pointer moves to the version (one PUT). Workers follow within their pointer check
   interval; SQL connections see the new version at their next ``connect()`` or ``refresh()``.
3. One ordinary reconciler run right after queues what was uploaded between the last staged run and
   the switch (those images were encoded under the previous version only).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from hashlake.catalog import Catalog, ModelNotFound
from hashlake.config import Settings
from hashlake.store import ObjectStore
from workers.intake.reconciler import ReconcileSummary, open_reconciler


class PromoteError(RuntimeError):
    """The version cannot be promoted now; the message says why and what to do."""


@dataclass(frozen=True)
class PromoteResult:
    version: str
    previous: str | None  # the version that was active before; None if none was
    listed: int  # objects in the images bucket at the last staged run
    indexed: int  # of those, with a codes row under the version
    failed: int  # of those, with a failure row under it (they are failures under the old one too, mostly)
    runs: int  # staged reconciler runs
    seconds: float


def _active_as_expected(catalog: Catalog, version: str, expected: str | None) -> str | None:
    """The active version (None: none yet); PromoteError when ``expected`` is given and it differs."""
    try:
        active = catalog.active()
    except ModelNotFound:
        active = None
    if expected is not None and active != expected:
        raise PromoteError(f"the active version is {active!r}, not {expected!r} which {version!r} was meant to "
                           f"replace (promoted meanwhile?): {version!r} is not switched to")
    return active


def promote(settings: Settings, version: str, *, timeout_s: float = 3600.0, poll_s: float = 5.0,
            progress: Callable[[ReconcileSummary], None] | None = None,
            expected_active: str | None = None) -> PromoteResult:
    """Re-encode the images bucket under ``version``, then make it the active version.

    expected_active: the version ``version`` is meant to replace (a retraining run's, which evaluated
    the candidate against it); when the pointer names another one, before the re-encode or just before
    the switch, nothing is switched: a promotion made meanwhile by someone else is not overridden.

    Raises ``ModelNotFound`` for an unknown version, and ``PromoteError`` when settings pin another
    version (pinned workers ignore the pointer), when the active version is not ``expected_active``,
    when no intake is running to send the work, or when the bucket is not covered within ``timeout_s``;
    the pointer is not moved then, and what was queued stays queued, so running it again continues
    where it stopped."""
    started = time.monotonic()
    catalog = Catalog(ObjectStore(settings), settings)
    catalog.card(version)  # ModelNotFound names an unknown version before anything is queued
    if settings.model_version and settings.model_version != version:
        raise PromoteError(f"settings pin model version {settings.model_version!r} (HASHLAKE_MODEL_VERSION): "
                           f"workers and queries ignore the active pointer; unpin it to promote {version!r}")
    previous = _active_as_expected(catalog, version, expected_active)
    with open_reconciler(settings) as reconciler:
        runs = 0
        while True:
            summary = reconciler.run_once(version=version)
            runs += 1
            if progress is not None:
                progress(summary)
            if summary.missing == 0:
                break
            if not summary.batcher_alive:
                raise PromoteError(f"{summary.missing} objects need encoding under {version!r} but no intake is "
                                   f"running to send them: start `hashlake intake` (or `hashlake stack up`) and "
                                   f"promote again")
            if time.monotonic() - started > timeout_s:
                raise PromoteError(f"{summary.missing} of {summary.listed} objects are still not encoded under "
                                   f"{version!r} after {timeout_s:.0f} s; they stay queued: promote again to go on "
                                   f"waiting (the active version is still {previous!r})")
            time.sleep(poll_s)
        _active_as_expected(catalog, version, expected_active)
        catalog.activate(version)
        reconciler.forget_staged(version)
        reconciler.run_once()  # uploads that arrived between the last staged run and the switch
    return PromoteResult(version, previous, summary.listed, summary.indexed, summary.failed, runs,
                         round(time.monotonic() - started, 3))
