"""`flexunet predict`: batch prediction through onnxruntime, in the light install.

Needs only the base distribution (onnxruntime, NumPy, Pillow, tqdm, PyYAML): TensorFlow
and pydantic are never imported. The settings come from the flags, over the `predict`
section of params.yaml (read with PyYAML into serving.settings.TilingSettings), over
TilingSettings' defaults. pipeline/cli.py registers the command.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import yaml

from common.errors import UserError
from serving.outputs import FORMATS
from serving.settings import TilingSettings, add_arguments, from_arguments

log = logging.getLogger("flexunet")

# Keys of params.yaml's `predict` section that the evaluate_tiled stage reads, not the predictor.
EVALUATION_KEYS = ("seam_width",)


def read_predict_section(path: Path) -> TilingSettings:
    """TilingSettings from `path`'s `predict` section (absent: the defaults)."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "syntax error"
        raise UserError(f"{path}: not valid YAML ({first})") from None
    if raw is not None and not isinstance(raw, dict):
        raise UserError(f"{path}: top level must be a mapping of sections")
    section = (raw or {}).get("predict")
    if section is None:
        return TilingSettings()
    if not isinstance(section, dict):
        raise UserError(f"{path}: 'predict' must be a mapping of settings, got {type(section).__name__}")
    return TilingSettings.from_mapping(section, f"{path}: predict", ignore=EVALUATION_KEYS)


def predict_settings(args: argparse.Namespace) -> TilingSettings:
    """Flags over the params file's `predict` section (--params, or ./params.yaml if there)."""
    base = TilingSettings()
    path = Path(args.params or "params.yaml")
    if args.params or path.is_file():
        try:
            base = read_predict_section(path)
        except UserError as exc:
            if args.params:  # asked for explicitly: its problem is the user's to fix
                raise
            log.warning("%s: ignored for predict defaults (%s)", path, exc)
    return from_arguments(args, base)


def cmd_predict(args: argparse.Namespace) -> int:
    """Batch prediction: exit status 0 all written, 1 some images failed (the rest written)."""
    from serving.batch import LocalEngine, resolve_inputs, run_batch

    if args.engine != "ray" and (args.address is not None or args.workers is not None):
        raise UserError("--address and --workers are options of --engine ray")
    if args.level is not None and args.mpp is not None:
        raise UserError("--level and --mpp both choose the slide level; give one")
    if (args.level is not None and args.level < 0) or (args.mpp is not None and not args.mpp > 0):
        raise UserError("--level must be >= 0 and --mpp > 0")
    settings = predict_settings(args)  # flags and inputs first: a typo fails before the model loads
    inputs = resolve_inputs(args.input)
    if args.engine == "ray":
        engine = ray_engine_class()(args.model, settings, workers=1 if args.workers is None else args.workers,
                                    address=args.address)
    else:
        from serving.load import load_predictor

        engine = LocalEngine(load_predictor(args.model, settings))
    summary = run_batch(engine, inputs, Path(args.output), overwrite=args.overwrite,
                        overlay=args.overlay, max_pixels=None if args.allow_large_images else "pillow",
                        format=args.format, geojson=args.geojson, level=args.level, mpp=args.mpp)
    return 1 if summary.failed else 0


def ray_engine_class() -> type:
    """serving.ray_engine.RayEngine, or a one-line UserError naming the [ray] extra when Ray
    is not installed (the local engine never imports ray)."""
    try:
        from serving.ray_engine import RayEngine
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in ("ray", "pyarrow", "pandas"):
            raise
        raise UserError(f"--engine ray needs Ray ({exc.name} is not installed): pip install 'flexunet[ray]'"
                        ) from None
    return RayEngine


def add_predict_parser(sub: Any) -> None:
    p = sub.add_parser("predict", help="ONNX prediction of images, slides and scans (NIfTI, DICOM series); the "
                                       "light install suffices")
    p.add_argument("--model", required=True, help="model.onnx, or an MLflow URI such as models:/name@champion")
    p.add_argument("--input", required=True,
                   help="folder of images, NIfTI scans (.nii, .nii.gz) and DICOM series folders (or one series "
                        "folder), a quoted glob such as 'scans/*.tif', or a manifest: a .csv or .parquet file with a "
                        "column 'path' of paths or file:// URIs")
    p.add_argument("--output", required=True,
                   help="folder for the masks (<stem>.png, <stem>.ome.zarr, scans: <stem>_seg.nii.gz), uncertainty "
                        "maps, GeoJSON, QC montages and predictions.csv")
    add_arguments(p)
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: one image after another in this process (default); ray: Ray Data actors "
                        "(pip install 'flexunet[ray]')")
    p.add_argument("--address", default=None,
                   help="--engine ray: the Ray cluster, 'auto' or ray://host:10001 (default: a local instance, "
                        "or RAY_ADDRESS)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="--engine ray: actors, each with one model session (default 1)")
    p.add_argument("--format", choices=FORMATS, default="auto",
                   help="png: <stem>.png masks; ome-zarr: <stem>.ome.zarr label images written chunk by chunk; "
                        "auto (default): OME-Zarr for whole-slide TIFF/OME-TIFF/SVS and images above 64 MP")
    p.add_argument("--geojson", action=argparse.BooleanOptionalAction, default=None,
                   help="write <stem>.geojson, the objects as QuPath annotations (default: with OME-Zarr outputs)")
    p.add_argument("--level", type=int, default=None, metavar="N",
                   help="whole-slide inputs: the pyramid level to predict (0 = full resolution)")
    p.add_argument("--mpp", type=float, default=None, metavar="UM",
                   help="whole-slide inputs: predict the level nearest this many microns per pixel "
                        "(default: the model's training resolution, when both are recorded)")
    p.add_argument("--overwrite", action="store_true", help="predict again images whose mask exists")
    p.add_argument("--overlay", action="store_true", help="also write overlays/<stem>.png")
    p.add_argument("--allow-large-images", action="store_true",
                   help="accept images above Pillow's decompression-bomb limit (~179 MP)")
    p.add_argument("--params", default=None,
                   help="take defaults from this file's predict section (default: ./params.yaml if present)")
    p.set_defaults(func=cmd_predict)
