"""What the benchmarks share: the model they time, and how results are written."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def default_model(params: Any) -> tuple[Any, str]:
    """models/model.keras if `make repro` trained one, else the same architecture randomly
    initialised (speed does not depend on the weights); and a label saying which."""
    import keras

    from pipeline.model.flexunet import build_flexunet

    trained = REPO / "models" / "model.keras"
    if trained.is_file():
        return keras.models.load_model(trained, compile=False), "models/model.keras"
    keras.utils.set_random_seed(params.train.seed)
    return build_flexunet(params.model), f"random init (seed {params.train.seed})"


def write_results(out: str | Path, result: dict, markdown: Callable[[dict], str]) -> None:
    """<out>.json and <out>.md (the table the docs quote), and the table on stdout."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    out.with_suffix(".md").write_text(table)
    print(table)
