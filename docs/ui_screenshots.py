"""Screenshots of the MLflow UI for docs/tracking.md: a training run and the champion version.

Not part of `make test`. By default it runs a small pipeline (prepare, train, evaluate,
export, register; 64 px, a few epochs) in a temporary project, so no real store is
touched; `--project DIR` uses the store of an existing project instead (its
models/train_run.json and models/registered.json say which run and version to show).
Then it starts `mlflow ui` on that store on a free loopback port and takes headless
Chromium screenshots of

- the training run's page (datasets, parameters, metrics): docs/mlflow_run.png
- the champion version's page (the model card in its description): docs/mlflow_model_version.png

    python docs/ui_screenshots.py [--project DIR] [--out docs/] [--keep]

Needs Chromium (Debian: `apt-get install chromium`) and the [pipeline] extra.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BIN = Path(sys.executable).parent
WINDOW = "1400,1000"


def small_params() -> dict:
    """params.yaml, shrunk to a couple of CPU minutes: 64 px, 5 levels, 16 subjects, no tuning."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["dataset"].update(image_size=64, num_subjects=16, num_large_images=4, num_mini_test=2)
    raw["model"].update(image_width=64, image_height=64, num_layers=5)
    raw["train"].update(use_tuned_params=False, max_minutes=None, num_infer_images=2)
    raw["evaluate"].update(num_panels=2, min_dice=0.0, min_real_dice=0.0)
    raw["mlflow"]["log_model"] = False
    return raw


def build_project(root: Path) -> None:
    """The pipeline's stages in-process, as `dvc repro` would run them (tune skipped)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "2")   # a short run still shows some
    os.environ.pop("MLFLOW_TRACKING_URI", None)                            # the temp project's own store
    from pipeline.cli import quiet_tensorflow
    from pipeline.config.load import params_from_dict
    from pipeline.layout import Layout

    raw = small_params()
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    layout = Layout(root, params_from_dict(raw))
    quiet_tensorflow(False, layout.params.train.onednn)   # before TensorFlow loads, as `flexunet <stage>` does
    from pipeline.stages.evaluate import evaluate
    from pipeline.stages.export import export
    from pipeline.stages.prepare import prepare
    from pipeline.stages.register import register
    from pipeline.stages.train import train

    for stage in (prepare, train, evaluate, export, register):
        print(f"[screenshots] {stage.__name__}", flush=True)
        stage(layout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"mlflow ui did not answer at {url} within {seconds:.0f} s")


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    raise SystemExit("no Chromium found: apt-get install chromium")


def screenshot(url: str, out: Path, budget_ms: int) -> None:
    args = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            f"--screenshot={out}", f"--window-size={WINDOW}", f"--virtual-time-budget={budget_ms}", url]
    subprocess.run(args, check=True, capture_output=True, timeout=180)
    print(f"[screenshots] {url} -> {out}")


def targets(root: Path, uri: str) -> tuple[str, str, str, str]:
    """(experiment id, training run id, model name, champion version) of the project."""
    from mlflow.tracking import MlflowClient

    run_id = json.loads((root / "models" / "train_run.json").read_text())["run_id"]
    registered = json.loads((root / "models" / "registered.json").read_text())
    client = MlflowClient(uri, registry_uri=uri)
    experiment = client.get_run(run_id).info.experiment_id
    champion = client.get_model_version_by_alias(registered["name"], "champion")
    return experiment, run_id, registered["name"], str(champion.version)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--project", type=Path, help="an existing project whose store to show (default: a new small one)")
    ap.add_argument("--out", type=Path, default=REPO / "docs")
    ap.add_argument("--keep", action="store_true", help="keep the temporary project (its path is printed)")
    ap.add_argument("--budget-ms", type=int, default=12000, help="Chromium's virtual time to render a page")
    args = ap.parse_args(argv)

    from pipeline.config.load import load_params
    from pipeline.tracking import resolve_tracking_uri

    temp = None
    if args.project is None:
        temp = Path(tempfile.mkdtemp(prefix="flexunet-ui-"))
        build_project(temp)
        root = temp
    else:
        root = args.project.resolve()
    uri = resolve_tracking_uri(load_params(root / "params.yaml").mlflow, root)
    experiment, run_id, name, version = targets(root, uri)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([str(BIN / "mlflow"), "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
                               "--port", str(port)], cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        wait_for(f"{base}/health")
        args.out.mkdir(parents=True, exist_ok=True)
        # MLflow 3.17's sidebar follows a per-browser GenAI / Model training switch (GenAI in a
        # fresh browser), not the experiment's mlflow.experimentKind tag: the query sets it.
        view = "?workflowType=machine_learning"
        screenshot(f"{base}/#/experiments/{experiment}/runs/{run_id}{view}", args.out / "mlflow_run.png",
                   args.budget_ms)
        screenshot(f"{base}/#/models/{name}/versions/{version}{view}", args.out / "mlflow_model_version.png",
                   args.budget_ms)
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        if temp is not None and not args.keep:
            shutil.rmtree(temp, ignore_errors=True)
        elif temp is not None:
            print(f"[screenshots] project kept in {temp}")


if __name__ == "__main__":
    main()
