"""Checkpoints: the strategy's weights and the run's progress after every completed round.

Two files in `DIR/checkpoint/`: `state-<round>.npz` (every weight set of the strategy, keys
"<set>::<state name>", and the weights of the round selected on validation so far under
"best@<set>::<state name>") and `progress.json` (the plan, the last completed round, the metrics so
far, the selected round, the held-out test scores once taken, and which state file belongs to
them). Keeping the selected round's weights is what lets a resumed run still score them on test. Each is written under a temporary name and renamed,
progress last, and the previous state file is removed only after that, so a run killed at any
moment resumes from the last round that was completely written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from analyses.federation.strategy import Weights

_SEP = "::"
_BEST = "best@"


@dataclass
class Checkpoint:
    round: int
    plan: dict[str, Any]
    history: list[dict[str, Any]]
    state: dict[str, Weights]
    best_round: int | None = None  # the round whose weights score best on pooled validation so far
    best_state: dict[str, Weights] | None = None
    test: dict[str, Any] | None = None  # held-out test scores, once the last round is done


def save_checkpoint(folder: Path, checkpoint: Checkpoint) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {f"{group}{_SEP}{name}": value for group, weights in checkpoint.state.items() for name, value in weights.items()}
    arrays.update({f"{_BEST}{group}{_SEP}{name}": value for group, weights in (checkpoint.best_state or {}).items()
                   for name, value in weights.items()})
    state_name = f"state-{checkpoint.round}.npz"
    tmp_state = folder / f"state-{checkpoint.round}.tmp.npz"
    np.savez(tmp_state, **arrays)
    os.replace(tmp_state, folder / state_name)
    progress = {"round": checkpoint.round, "state_file": state_name, "plan": checkpoint.plan, "history": checkpoint.history,
                "best_round": checkpoint.best_round, "test": checkpoint.test}
    tmp_progress = folder / "progress.json.tmp"
    tmp_progress.write_text(json.dumps(progress, indent=1))
    os.replace(tmp_progress, folder / "progress.json")
    for old in folder.glob("state-*.npz"):
        if old.name != state_name:
            old.unlink()


def load_checkpoint(folder: Path) -> Checkpoint | None:
    """The last completed round, or None if this folder holds no checkpoint."""
    if not (folder / "progress.json").is_file():
        return None
    progress = json.loads((folder / "progress.json").read_text())
    state: dict[str, Weights] = {}
    best: dict[str, Weights] = {}
    with np.load(folder / progress["state_file"]) as arrays:
        for key in arrays.files:
            group, name = key.split(_SEP, 1)
            target = best if group.startswith(_BEST) else state
            target.setdefault(group.removeprefix(_BEST), {})[name] = arrays[key]
    return Checkpoint(round=progress["round"], plan=progress["plan"], history=progress["history"], state=state,
                      best_round=progress.get("best_round"), best_state=best or None, test=progress.get("test"))
