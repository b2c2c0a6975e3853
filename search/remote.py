"""Resume state in the study's artifact store, so that a retry on another machine resumes too.

Without a folder that every machine mounts, a trial killed on machine A leaves its ``last.pt`` on A, and
its retry on machine B would start from epoch 0: at paper scale, hours of GPU time per preemption. With
``study.checkpoint_every: N`` the worker uploads ``last.pt`` to the artifact store (a bucket, or a
folder) every N epochs, the pattern of Optuna's own PyTorch checkpoint example, and records where in the
trial's user attr ``resume_state``. A retry inherits that attr from the attempt it copies and downloads
the state, unless a local one is at least as new.

The state is written with the store's own ``write``, not ``upload_artifact``: it is scratch, replaced
every N epochs and dropped when the trial ends, so it never joins the trial's listed artifacts (which
Optuna's retry callback would copy onto every retry).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.artifacts import download_artifact

from search import compat
from trainer.checkpoint import STATE_FILE, UnreadableStateError, load_history

ATTR = "resume_state"  # user attr: {"artifact_id": ..., "epochs": epochs the uploaded state holds}


def drop(store: compat.ArtifactStore, attrs: dict[str, Any]) -> None:
    """Remove the uploaded state ``attrs`` point to (a trial that ended for good needs it no more)."""
    saved = attrs.get(ATTR)
    if saved:
        with contextlib.suppress(Exception):  # already gone, or the store is away: only scratch is left
            store.remove(saved["artifact_id"])


def _reason(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).strip()[:200]}"


class RemoteState:
    """One trial's uploads (every ``every`` epochs; 0: never) and its retry's download. A store that
    cannot be reached costs a warning, never the trial: the local ``last.pt`` still serves a local retry."""

    def __init__(self, store: compat.ArtifactStore, every: int, warn: Callable[[str], None]) -> None:
        self.store, self.every, self.warn = store, every, warn

    def upload(self, trial: optuna.Trial, directory: Path, epochs: int) -> None:
        """After epoch ``epochs`` (its ``last.pt`` just written): upload it if it is the N-th, then remove
        the one uploaded before, so the store holds one state per trial."""
        if not self.every or epochs % self.every:
            return
        previous = trial.user_attrs
        artifact_id = f"resume-{uuid.uuid4().hex}"
        try:
            with open(directory / STATE_FILE, "rb") as f:
                self.store.write(artifact_id, f)
        except Exception as err:  # noqa: BLE001 - S3, GCS and file systems each raise their own
            self.warn(f"cannot upload the resume state after epoch {epochs} ({_reason(err)}); training goes on")
            return
        trial.set_user_attr(ATTR, {"artifact_id": artifact_id, "epochs": epochs})
        drop(self.store, previous)

    def fetch(self, attrs: dict[str, Any], directory: Path) -> None:
        """Download the state ``attrs`` (the retry's, inherited) point to into ``directory``, unless the
        ``last.pt`` there holds as many epochs."""
        saved = attrs.get(ATTR)
        if not saved:
            return
        with contextlib.suppress(UnreadableStateError):  # an unreadable local state loses to the upload
            if len(load_history(directory)) >= saved["epochs"]:
                return
        tmp = directory / f"{STATE_FILE}.download"
        tmp.unlink(missing_ok=True)
        try:
            download_artifact(artifact_store=self.store, file_path=str(tmp), artifact_id=saved["artifact_id"])
        except Exception as err:  # noqa: BLE001
            tmp.unlink(missing_ok=True)
            self.warn(f"cannot download the resume state after epoch {saved['epochs']} ({_reason(err)}); "
                      f"resuming from what this machine has")
            return
        tmp.replace(directory / STATE_FILE)
