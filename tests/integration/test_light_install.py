"""The light install: `pip install flexunet` (no extras) into a fresh venv runs `flexunet predict`,
has no TensorFlow (nor Ray), and every other command (and `predict --engine ray`) says in one
line which extra to install."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.onnx_models import make_tiny_onnx

REPO = Path(__file__).resolve().parents[2]
PACKAGE_FILES = ("pyproject.toml", "README.md", "common", "pipeline", "serving")
# What pip prints when it cannot reach the package registry (the only reason to skip).
OFFLINE = ("NewConnectionError", "Failed to establish a new connection", "Temporary failure in name resolution",
           "Network is unreachable", "ProxyError", "Could not fetch URL", "No route to host")

pytestmark = pytest.mark.slow


def _run(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def light_venv(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A fresh venv holding the repo's base distribution only (pip's cache keeps this fast)."""
    root = tmp_path_factory.mktemp("light")
    src = root / "src"  # a copy, so pip's build writes nothing into the work tree
    for name in PACKAGE_FILES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(path, src / name)
    venv = root / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = _run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "-c",
                str(REPO / "requirements-lock.txt"), str(src)], env, root, timeout=1200)
    if pip.returncode != 0:
        if any(sign in pip.stderr + pip.stdout for sign in OFFLINE):
            pytest.skip("pip cannot reach the package registry: " + pip.stderr.strip().splitlines()[-1])
        pytest.fail(f"pip install of the base distribution failed:\n{pip.stderr[-3000:]}")
    return venv, env


def test_base_install_has_no_pipeline_dependencies(light_venv, tmp_path):
    venv, env = light_venv
    for module in ("tensorflow", "pydantic", "mlflow", "ray"):
        out = _run([str(venv / "bin" / "python"), "-c", f"import {module}"], env, tmp_path)
        assert out.returncode != 0 and "ModuleNotFoundError" in out.stderr, (module, out.stderr)


def test_predict_writes_masks_and_table(light_venv, tmp_path):
    venv, env = light_venv
    model = make_tiny_onnx(tmp_path / "model.onnx")
    (tmp_path / "in").mkdir()
    image = np.random.default_rng(0).integers(0, 256, (45, 70, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "in" / "scan.png")
    out = _run([str(venv / "bin" / "flexunet"), "predict", "--model", str(model), "--input", "in",
                "--output", "out"], env, tmp_path)
    assert out.returncode == 0, out.stderr
    mask = Image.open(tmp_path / "out" / "scan.png")
    assert mask.mode == "P" and mask.size == (70, 45)
    with (tmp_path / "out" / "predictions.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1 and rows[0]["status"] == "ok" and rows[0]["skipped_tiles"] == "0"


def test_other_commands_name_the_extra_in_one_line(light_venv, tmp_path):
    venv, env = light_venv
    exe = str(venv / "bin" / "flexunet")
    for args, extra in ((["train"], "pipeline"), (["check"], "pipeline"),
                        (["predict", "--model", "models:/m@champion", "--input", ".", "--output", "o"], "mlflow"),
                        (["predict", "--engine", "ray", "--model", "m.onnx", "--input", ".", "--output", "o"], "ray")):
        (tmp_path / "x.png").write_bytes(b"")  # predict needs an input before it looks at the model
        out = _run([exe, *args], env, tmp_path)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1, (args, out.stderr)
        assert lines[0].startswith("error: ") and f"pip install 'flexunet[{extra}]'" in lines[0], lines


def test_predict_reads_a_pyramidal_tiff_and_writes_ome_zarr_and_geojson(light_venv, tmp_path):
    import tifffile

    venv, env = light_venv
    model = make_tiny_onnx(tmp_path / "model.onnx", tile_size=32)
    (tmp_path / "in").mkdir()
    level0 = np.random.default_rng(1).integers(0, 256, (300, 420, 3), dtype=np.uint8)
    with tifffile.TiffWriter(tmp_path / "in" / "slide.ome.tif") as tif:
        tif.write(level0, subifds=1, tile=(64, 64), photometric="rgb", compression="zlib")
        tif.write(level0[::2, ::2], subfiletype=1, tile=(64, 64), photometric="rgb", compression="zlib")
    out = _run([str(venv / "bin" / "flexunet"), "predict", "--model", str(model), "--input", "in",
                "--output", "out"], env, tmp_path)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "out" / "slide.ome.zarr" / "labels" / "segmentation" / "0" / "zarr.json").is_file()
    assert (tmp_path / "out" / "slide.uncertainty.zarr" / "uncertainty" / "zarr.json").is_file()
    assert '"FeatureCollection"' in (tmp_path / "out" / "slide.geojson").read_text()


def test_a_scan_names_the_volumes_extra_in_one_line(light_venv, tmp_path):
    from tests.onnx_models import make_kidney_onnx
    from tests.scan_files import oracle_scan, save_nifti

    venv, env = light_venv
    volume = oracle_scan(spacing_mm=6.0, slices=12)
    save_nifti(tmp_path / "in" / "scan.nii.gz", volume.image, volume.affine)
    Image.fromarray(np.full((40, 30), 90, np.uint8)).save(tmp_path / "in" / "slice.png")
    out = _run([str(venv / "bin" / "flexunet"), "predict", "--model", str(make_kidney_onnx(tmp_path / "k.onnx")),
                "--input", "in", "--output", "out"], env, tmp_path)
    errors = [line for line in out.stderr.splitlines() if " ERROR " in line]
    assert out.returncode == 1 and len(errors) == 1, out.stderr
    assert errors[0].endswith("scan.nii.gz: scan (NIfTI / DICOM) input needs nibabel, which is not installed: "
                              "pip install 'flexunet[volumes]'"), errors
    assert (tmp_path / "out" / "slice.png").is_file() and not (tmp_path / "out" / "scan_seg.nii.gz").exists()
