"""Progress of long stages, shown in the Prefect UI (a progress artifact) and the terminal."""

from __future__ import annotations

from collections.abc import Callable
from uuid import UUID

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from pydantic import JsonValue

#: An audit recorder: ``record(event, actor=..., **details)`` (as tasks.canary takes it).
Record = Callable[..., None]


class StageProgress:
    """A progress bar for one stage of ``total`` steps.

    Args:
        key: the artifact key (lower case letters, digits, dashes).
        title: what the stage is, e.g. "canary of hello sha256:ab12 in dev".
        total: how many steps make 100%.
    """

    def __init__(self, key: str, title: str, total: int) -> None:
        self.title = title
        self.total = max(1, total)
        self.done = 0
        created = create_progress_artifact(0.0, key=key, description=f"{title}: starting")
        assert isinstance(created, UUID)  # the sync call in a flow returns the id
        self.artifact = created
        print(f"{title}: 0/{self.total}")

    def step(self, note: str) -> None:
        """One more step done; ``note`` says what it found."""
        self.done = min(self.total, self.done + 1)
        text = f"{self.title}: {self.done}/{self.total} {note}"
        update_progress_artifact(self.artifact, 100.0 * self.done / self.total, description=text[:500])
        print(text)

    def at(self, done: int, note: str) -> None:
        """``done`` steps of ``total`` are done (a stage whose progress can be re-read, e.g. the
        approvals a resumed run restored); ``note`` says where it stands."""
        self.done = min(self.total, max(0, done))
        text = f"{self.title}: {self.done}/{self.total} {note}"
        update_progress_artifact(self.artifact, 100.0 * self.done / self.total, description=text[:500])
        print(text)

    def tracking(self, record: Record, event: str, describe: Callable[[dict[str, JsonValue]], str]) -> Record:
        """``record`` that also advances the bar whenever ``event`` is recorded."""
        def recorded(name: str, actor: str = "portcullis", **details: JsonValue) -> None:
            record(name, actor, **details)
            if name == event:
                self.step(describe(details))

        return recorded
