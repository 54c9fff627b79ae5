"""`flexunet predict --engine ray` (serving/ray_engine.py) against the local engine, on one
local Ray instance for the module (2 CPUs) and a tiny ONNX model: the same mask and overlay
bytes, the same table rows (timings aside), resume, error rows, manifests; and the MLflow
pyfunc model predicting inside a Ray task."""

from __future__ import annotations

import base64
import csv
import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main
from serving.batch import CSV_NAME
from tests.onnx_models import make_tiny_onnx

ray = pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[2]
SIZES = {"a": (40, 56), "b": (70, 33), "c": (32, 32), "d": (90, 100)}
TIMING = "seconds"


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    # The workers import this checkout's serving/ (not whatever flexunet the venv installed).
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny_onnx(tmp_path_factory.mktemp("model") / "model.onnx", tile_size=32, size_multiple=4)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Four RGB images of odd sizes (several windows each) and one corrupt file."""
    folder = tmp_path_factory.mktemp("in")
    for i, (name, (h, w)) in enumerate(SIZES.items()):
        ramp = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
        noise = np.random.default_rng(i).normal(0, 25, (h, w, 3))
        Image.fromarray(np.clip(ramp + noise, 0, 255).astype(np.uint8)).save(folder / f"{name}.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return folder


def predict(model: Path, source: str | Path, out: Path, *args: str) -> int:
    return main(["predict", "--model", str(model), "--input", str(source), "--output", str(out), "--overlay", *args])


def rows(out: Path) -> list[dict[str, str]]:
    with (out / CSV_NAME).open(newline="") as fh:
        return list(csv.DictReader(fh))


def untimed(out: Path) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if k != TIMING} for r in rows(out)]


def files(out: Path) -> dict[str, bytes]:
    """Every mask and overlay, by path relative to the output folder."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.png"))}


def test_same_outputs_as_local_then_resume_from_manifests(tmp_path, model, inputs):
    local, distributed = tmp_path / "local", tmp_path / "ray"
    assert predict(model, inputs, local) == 1                              # the corrupt file fails
    assert predict(model, inputs, distributed, "--engine", "ray", "--workers", "2") == 1
    assert files(distributed) == files(local) and len(files(local)) == 3 * len(SIZES)   # mask, overlay, uncertainty
    assert untimed(distributed) == untimed(local)
    by_file = {Path(r["file"]).stem: r for r in rows(distributed)}
    assert by_file["corrupt"]["status"].startswith(f"error: {inputs / 'corrupt.png'}: not a readable image")
    assert all(by_file[n]["status"] == "ok" and int(by_file[n]["tiles"]) >= 1 for n in SIZES)
    assert [r["file"] for r in rows(distributed)] == sorted(r["file"] for r in rows(distributed))

    # Resume, the same inputs listed by a CSV manifest (local) and a Parquet one (ray): masks
    # on disk are kept untouched, the missing ones predicted again, in both engines.
    listed = [str(inputs / f"{name}.png") for name in SIZES] + [str(inputs / "corrupt.png")]
    listed[0] = Path(listed[0]).as_uri()                                   # file:// URIs are paths too
    manifest_csv = tmp_path / "images.csv"
    manifest_csv.write_text("subject,path\n" + "".join(f"s{i},{p}\n" for i, p in enumerate(listed)))
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    manifest_parquet = tmp_path / "images.parquet"
    pq.write_table(pa.table({"path": listed, "subject": [f"s{i}" for i in range(len(listed))]}), manifest_parquet)
    first = {Path(r["file"]).stem: r for r in rows(distributed)}
    for out in (local, distributed):
        (out / "b.png").unlink()
        (out / "overlays" / "d.png").unlink()
        for mask in out.glob("*.png"):
            os.utime(mask, ns=(10**18, 10**18))
    assert predict(model, manifest_csv, local) == 1
    assert predict(model, manifest_parquet, distributed, "--engine", "ray") == 1
    assert files(distributed) == files(local)
    assert untimed(distributed) == untimed(local)
    again = {Path(r["file"]).stem: r for r in rows(distributed)}
    assert sorted(again) == sorted(first) and again["corrupt"]["status"] == first["corrupt"]["status"]
    assert again["b"]["status"] == "ok" and (distributed / "b.png").stat().st_mtime_ns != 10**18
    for name in ("a", "c", "d"):
        assert again[name]["status"] == "skipped-existing" and again[name][TIMING] == first[name][TIMING]
        assert (distributed / f"{name}.png").stat().st_mtime_ns == 10**18
    assert (distributed / "overlays" / "d.png").is_file()                 # drawn from the existing mask


class Segment:
    """docs/serving.md's snippet: the registered pyfunc model in a Ray Data actor."""

    def __init__(self, uri: str):
        import mlflow.pyfunc

        self.model = mlflow.pyfunc.load_model(uri)

    def __call__(self, batch):          # a pandas DataFrame with the image bytes in `bytes`
        out = self.model.predict(batch.rename(columns={"bytes": "image"})[["image"]])
        return out.assign(path=batch["path"].values)   # mask_png (base64), height, width, pixels_*


def test_pyfunc_model_predicts_inside_ray_data(tmp_path, model, inputs):
    """The pyfunc model (serving/pyfunc.py), saved as register logs it and loaded with
    mlflow.pyfunc.load_model in a map_batches actor, gives the local engine's mask."""
    import mlflow.pyfunc

    from serving.pyfunc import ONNX_ARTIFACT, FlexUNetPyfunc

    saved = tmp_path / "pyfunc"
    mlflow.pyfunc.save_model(str(saved), python_model=FlexUNetPyfunc(), artifacts={ONNX_ARTIFACT: str(model)},
                             pip_requirements=[])
    assert predict(model, inputs / "d.png", tmp_path / "local") == 0
    masks = (ray.data.read_binary_files(str(inputs / "d.png"), include_paths=True)
             .map_batches(Segment, fn_constructor_kwargs={"uri": str(saved)}, batch_size=1, batch_format="pandas",
                          compute=ray.data.ActorPoolStrategy(size=1)))
    [out] = masks.take_all()
    ids = np.asarray(Image.open(io.BytesIO(base64.b64decode(out["mask_png"]))))
    np.testing.assert_array_equal(ids, np.asarray(Image.open(tmp_path / "local" / "d.png")))
    assert (out["height"], out["width"]) == SIZES["d"] and out["path"].endswith("d.png")


def test_a_scan_is_one_ray_task_with_the_local_engines_outputs(tmp_path):
    """NIfTI and DICOM scans through Ray Data: each one task, the same label volumes and rows."""
    from tests.onnx_models import make_kidney_onnx
    from tests.scan_files import oracle_scan, save_nifti, write_dicom_series

    model = make_kidney_onnx(tmp_path / "kidney.onnx")
    volume = oracle_scan(spacing_mm=6.0, slices=12, orientation="LIP")
    save_nifti(tmp_path / "in" / "scan.nii.gz", volume.image, volume.affine)
    write_dicom_series(tmp_path / "in" / "series", volume.image, volume.affine)
    local, distributed = tmp_path / "local", tmp_path / "ray"
    assert predict(model, tmp_path / "in", local) == 0
    assert predict(model, tmp_path / "in", distributed, "--engine", "ray", "--workers", "2") == 0
    volumes = {p.name: p.read_bytes() for p in sorted(local.glob("*_seg.nii.gz"))}
    assert sorted(volumes) == ["scan_seg.nii.gz", "series_seg.nii.gz"]
    import nibabel as nib

    for name in volumes:
        a, b = nib.load(str(local / name)), nib.load(str(distributed / name))
        assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj)) and np.allclose(a.affine, b.affine)
    assert untimed(distributed) == untimed(local) and all(float(r["tkv_ml"]) > 50 for r in rows(local))
