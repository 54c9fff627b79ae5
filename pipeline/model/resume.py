"""A killed training resumes at its last completed epoch and gives the same model.

State lives in `checkpoints/train/<key>/`, outside the train stage's DVC outputs (DVC
deletes those before the stage reruns, as it would the Optuna journal, which lives in
`optuna/` for the same reason). `<key>` hashes everything the weights depend on (the
effective model/train/mask params and the dataset fingerprint), so a changed
configuration never resumes another one's state; it starts over.

At the end of every epoch one folder `epoch-<n>/` is written into a temporary folder and
renamed into place (then the previous one is deleted), so a kill at any moment leaves a
whole epoch folder behind:
- `model.weights.h5`: the weights and the optimizer state (Adam's moments, its step
  counter, the current learning rate), Keras' own `save_weights`;
- `state.json`: epochs completed, the per-epoch history, seconds of fitting, the MLflow
  run, and the states of EarlyStopping, ReduceLROnPlateau and the best-weights checkpoint.

Keras' BackupAndRestore keeps weights and the epoch only, in two files written one after
the other. What else an epoch depends on needs no saving here: the data order and the
augmentation are functions of (seed, epoch) (`dataset.training_stream`), and dropout's
seeds are set from (seed, epoch) when an epoch begins (`callbacks.EpochSeeds`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras

from pipeline.config.schema import Params
from common.atomic import atomic_dir, write_json

log = logging.getLogger(__name__)

STATE_ROOT = Path("checkpoints") / "train"
# Callback attributes that carry state from one epoch to the next.
_CALLBACK_STATE = {
    "EarlyStopping": ("wait", "best", "best_epoch"),
    "ReduceLROnPlateau": ("wait", "best", "cooldown_counter"),
    "ModelCheckpoint": ("best",),
}
# train keys that do not change the weights (how a run is watched or limited).
_NOT_WEIGHTS = ("max_minutes", "resume", "epoch_change_infer", "epoch_change_tiled_infer", "num_infer_images",
                "cache", "use_tuned_params")


def state_key(params: Params, fingerprint: str | None) -> str:
    train = params.train.model_dump(mode="json")
    for key in _NOT_WEIGHTS:
        train.pop(key, None)
    doc = {"model": params.model.model_dump(mode="json"), "train": train, "fingerprint": fingerprint,
           "rgb_map": sorted(map(str, params.mask.rgb_map.items()))}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Snapshot:
    """The last completed epoch of an unfinished training."""

    folder: Path
    epochs_done: int
    history: dict[str, list[float]]
    seconds: float
    run_id: str | None
    callbacks: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def weights(self) -> Path:
        return self.folder / "model.weights.h5"


@dataclass
class TrainingState:
    """The resume folder of one training configuration."""

    folder: Path

    @classmethod
    def for_params(cls, project_root: Path, params: Params, fingerprint: str | None) -> TrainingState:
        return cls(project_root / STATE_ROOT / state_key(params, fingerprint))

    @property
    def best_weights(self) -> Path:
        """Where the best-weights checkpoint (keep_weights: best) writes."""
        return self.folder / "best.weights.h5"

    def latest(self) -> Snapshot | None:
        """The newest complete epoch folder, or None (nothing to resume)."""
        done = sorted(self.folder.glob("epoch-*/state.json"))
        if not done:
            return None
        path = done[-1]
        raw = json.loads(path.read_text(encoding="utf-8"))
        return Snapshot(path.parent, int(raw["epochs_done"]), raw["history"], float(raw["seconds"]),
                        raw.get("run_id"), raw.get("callbacks", {}))

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        others = [p.name for p in self.folder.parent.glob("*") if p.is_dir()] if self.folder.parent.is_dir() else []
        if others:
            log.info("%s also holds unfinished trainings of other params (%s); delete them if unneeded",
                     self.folder.parent, ", ".join(sorted(others)))


def restore(model: keras.Model, snapshot: Snapshot) -> None:
    """Weights and optimizer state of the snapshot into a compiled model."""
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    model.load_weights(snapshot.weights)


class SaveEpoch(keras.callbacks.Callback):
    """Writes the epoch folder at every epoch end. Put it after every callback whose state
    it records, so it sees their state after this epoch."""

    def __init__(self, state: TrainingState, run_id: str, tracked: list[keras.callbacks.Callback],
                 history: dict[str, list[float]], seconds_used, keep: int = 1):
        super().__init__()
        self.state, self.run_id, self.tracked = state, run_id, tracked
        self.history = {k: list(v) for k, v in history.items()}
        self.seconds_used, self.keep = seconds_used, keep

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))
        with atomic_dir(self.state.folder / f"epoch-{epoch + 1:05d}") as tmp:
            self.model.save_weights(tmp / "model.weights.h5")
            write_json(tmp / "state.json", {
                "epochs_done": epoch + 1, "history": self.history, "seconds": round(self.seconds_used(), 3),
                "run_id": self.run_id, "callbacks": callback_states(self.tracked)})
        for old in sorted(self.state.folder.glob("epoch-*"))[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)


class RestoreCallbacks(keras.callbacks.Callback):
    """Puts the snapshot's callback states back once the callbacks have reset themselves
    (Keras callbacks reset in on_train_begin): put it after them in the list."""

    def __init__(self, tracked: list[keras.callbacks.Callback], states: dict[str, dict[str, Any]]):
        super().__init__()
        self.tracked, self.states = tracked, states

    def on_train_begin(self, logs=None):
        for callback in self.tracked:
            name = type(callback).__name__
            for attr, value in self.states.get(name, {}).items():
                setattr(callback, attr, _from_json(value))


def callback_states(callbacks: list[keras.callbacks.Callback]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for callback in callbacks:
        attrs = _CALLBACK_STATE.get(type(callback).__name__)
        if attrs:
            out[type(callback).__name__] = {a: _to_json(getattr(callback, a, None)) for a in attrs}
    return out


def _to_json(value: Any) -> Any:
    if value is None:
        return None
    value = float(value) if not isinstance(value, int) else value
    return {"float": repr(value)} if isinstance(value, float) and not math.isfinite(value) else value


def _from_json(value: Any) -> Any:
    return float(value["float"]) if isinstance(value, dict) else value
