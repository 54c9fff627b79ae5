"""The CLI turns user errors into one line on stderr and exit status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import tiny_dict

FLEXUNET = [sys.executable, "-m", "pipeline.cli"]
REPO = Path(__file__).resolve().parents[2]


def run(args, cwd):
    return subprocess.run(FLEXUNET + args, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})


def test_params_typo_is_one_line_and_exit_2(tmp_path):
    raw = tiny_dict()
    raw["model"]["base_filter"] = raw["model"].pop("base_filters")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    out = run(["check"], tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: params.yaml: unknown key 'model.base_filter'")
    assert "Traceback" not in out.stderr


def test_check_ok_and_missing_data_error(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_dict()))
    ok = run(["check"], tmp_path)
    assert ok.returncode == 0 and "OK (kidney-t2w, 32px, 3 levels)" in ok.stdout
    out = run(["train"], tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path}/data/kidney-t2w/manifest.json: not found; run the prepare stage first (dvc repro prepare)")
    assert "Traceback" not in out.stderr and "cuInit" not in out.stderr


def test_debug_shows_traceback(tmp_path):
    (tmp_path / "params.yaml").write_text("model: {base_filter: 3}\n")
    out = run(["--debug", "check"], tmp_path)
    assert out.returncode != 0 and "Traceback" in out.stderr


def test_override_flag_and_preset(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_dict()))
    bad = run(["check", "-S", "model.base_kernels=[4,4]"], tmp_path)
    assert bad.returncode == 2 and "kernel sizes must be odd" in bad.stderr
    out = run(["preset", "seed-kidney-t2w-gpu"], tmp_path)
    assert out.returncode == 0
    assert yaml.safe_load((tmp_path / "params.yaml").read_text())["model"]["num_layers"] == 8
    assert yaml.safe_load((tmp_path / "params.yaml.bak").read_text())["model"]["num_layers"] == 3
    unknown = run(["preset", "nope"], tmp_path)
    assert unknown.returncode == 2 and "available: " in unknown.stderr
