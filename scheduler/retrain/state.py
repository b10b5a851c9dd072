"""A retraining run's record: which steps are done, with their figures, in ``s3://<index_bucket>/jobs/<run>/``.

The job writes it after every step (and every progress tick), so that

- a rerun of the same run id skips the steps already done (each step's outputs are named by the run:
  the candidate version, its checkpoint, its codes rows), which is what makes the job resumable;
- ``hashlake retrain --wait`` draws its progress bar from ``progress``, and ``hashlake jobs`` lists runs
  with their outcome and figures, without asking Ray (whose job table forgets runs when the head restarts).

Outcomes: ``succeeded`` (candidate promoted), ``rejected`` (the gate kept the active version; ``reason``
says why), ``failed`` (an error; ``reason`` is its message; a rerun continues), ``running``.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

from hashlake.config import Settings
from hashlake.store import ObjectMissing, ObjectStore

STEPS = ("data", "train", "evaluate", "reencode", "flip")
OUTCOMES = ("running", "succeeded", "rejected", "failed")
PREFIX = "jobs/"


@dataclass
class RunState:
    run_id: str
    mode: str  # "head" | "finetune"
    outcome: str = "running"
    reason: str | None = None
    steps: dict[str, dict] = field(default_factory=dict)  # finished step → its figures (seconds included)
    progress: dict = field(default_factory=dict)  # {"step", "done", "total"} of the step under way
    candidate: str | None = None  # the model version this run trains
    previous: str | None = None  # the active version when the run started
    started_at: float = field(default_factory=time.time)  # epoch s
    updated_at: float = field(default_factory=time.time)

    def done(self, step: str) -> bool:
        return step in self.steps

    @property
    def figures(self) -> dict:
        """Every step's figures in one flat dict (``train.val_map``, ``evaluate.candidate_map``, ...)."""
        return {f"{step}.{name}": value for step, figures in self.steps.items() for name, value in figures.items()}


class RunLog:
    """Run records in the index bucket: one JSON object per run."""

    def __init__(self, settings: Settings, store: ObjectStore | None = None):
        self.settings = settings
        self.store = store or ObjectStore(settings)

    def _key(self, run_id: str) -> str:
        return f"{PREFIX}{run_id}/state.json"

    def load(self, run_id: str) -> RunState | None:
        try:
            body, _ = self.store.get(self.settings.index_bucket, self._key(run_id))
        except ObjectMissing:
            return None
        return RunState(**json.loads(body))

    def save(self, state: RunState) -> None:
        state.updated_at = time.time()
        self.store.put(self.settings.index_bucket, self._key(state.run_id), json.dumps(asdict(state)).encode(),
                       content_type="application/json")

    def runs(self) -> list[RunState]:
        """Every recorded run, newest first."""
        keys = [info.key for info in self.store.list(self.settings.index_bucket, PREFIX)
                if info.key.endswith("/state.json")]
        states = [state for key in keys if (state := self.load(key[len(PREFIX):-len("/state.json")])) is not None]
        return sorted(states, key=lambda s: s.started_at, reverse=True)
