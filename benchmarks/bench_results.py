"""What the benchmarks share: the machine they name, the model they time, and how results are written."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def default_model(params: Any) -> tuple[Any, str, Any]:
    """The model `make repro` trains: params with the tune stage's values when
    train.use_tuned_params (tune/best_params.yaml), models/model.keras's weights when it is
    that architecture, else the architecture randomly initialised (speed does not depend
    on the weights); a label saying which, and the params the model was built from."""
    import keras

    from pipeline.config.load import with_tuned_params
    from pipeline.model.flexunet import build_flexunet

    tuned = REPO / "tune" / "best_params.yaml"
    if params.train.use_tuned_params and tuned.is_file():
        params = with_tuned_params(params, tuned)
    keras.utils.set_random_seed(params.train.seed)
    model = build_flexunet(params.model)
    trained = REPO / "models" / "model.keras"
    if trained.is_file():
        loaded = keras.models.load_model(trained, compile=False)
        if [w.shape for w in loaded.weights] == [w.shape for w in model.weights]:
            return loaded, "models/model.keras", params
    return model, f"random init (seed {params.train.seed})", params


def scratch_project(folder: Path) -> list[str]:
    """A throw-away project in `folder` with this checkout's params.yaml; returns the
    overrides (for run_stages) that read this checkout's real sample in place."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "params.yaml", folder / "params.yaml")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    sample = raw["evaluate"].get("real_sample")
    # JSON-quoted: the values are read as YAML, and a path may hold characters YAML would parse.
    return [f"evaluate.real_sample={json.dumps(str(REPO / sample))}"] if sample else []


def run_stages(project: Path, stages: Iterable[str], overrides: Iterable[str] = (), label: str = "") -> dict[str, float]:
    """Run `flexunet <stage>` for each stage in a throw-away project folder (its params.yaml)
    with this checkout's code and its own MLflow store; seconds per stage. A failing stage
    ends the benchmark with its name, `label` and the end of its stderr."""
    python = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv").is_dir() else sys.executable
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    args = [a for kv in overrides for a in ("-S", kv)]
    seconds = {}
    for stage in stages:
        start = time.perf_counter()
        done = subprocess.run([python, "-m", "pipeline.cli", stage, "--params", str(project / "params.yaml"), *args],
                              cwd=project, env=env, capture_output=True, text=True)
        seconds[stage] = round(time.perf_counter() - start, 1)
        if done.returncode:
            raise SystemExit(f"{label}: flexunet {stage} failed:\n{done.stderr[-3000:]}")
    return seconds


def write_results(out: str | Path, result: dict, markdown: Callable[[dict], str]) -> None:
    """<out>.json and <out>.md (the table the docs quote), and the table on stdout."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    out.with_suffix(".md").write_text(table)
    print(table)


# --------------------------------------------------------------------------- the machine (no TensorFlow)
def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def vector_isa(flags: set[str]) -> str:
    """The widest x86 vector ISA the CPU offers: AMX, AVX-512, AVX2 or older."""
    if "amx_tile" in flags:
        return "AMX"
    if "avx512f" in flags:
        return "AVX-512"
    if "avx2" in flags:
        return "AVX2"
    return "AVX" if "avx" in flags else "SSE"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_summary() -> dict:
    """CPU name, core count and vector ISA: what every benchmark result names."""
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "vector_isa": vector_isa(cpu_flags())}
