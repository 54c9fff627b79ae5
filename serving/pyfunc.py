r"""MLflow pyfunc wrapper: `mlflow models serve` segments whole images of any size.

The registered model (`models:/<name>@champion`, logged by pipeline/stages/register.py) holds the
ONNX file as artifact `onnx` and this module's `FlexUNetPyfunc`, which runs
serving.predictor.TiledPredictor over each image: windows of the training size,
Gaussian-blended, so the image size is free (no resizing).

Request: POST /invocations, `Content-Type: application/json`, a DataFrame in
`dataframe_split` (or `dataframe_records`) form, one row per image:
- `image` (required): the encoded image file (PNG, JPEG, TIFF, BMP) base64-encoded.
  Converted to the model's channels by common/imageio's rules (RGBA drops alpha,
  grey is replicated, 16-bit is min-max stretched).
- `overlap` (optional float in [0, 1)): window overlap; default the served model's
  (params.yaml predict.overlap at registration).
- `tta` (optional bool): flip test-time augmentation with the flips in the model card (up to 4x compute); default false.

Response: `{"predictions": [...]}`, one record per image with
- `mask_png`: base64 palette PNG of the class ids, coloured like the training masks;
- `height`, `width`: the mask size (= the image size);
- `pixels_<class name>`: pixel count of each class (e.g. `pixels_background`).

    mlflow models serve -m "models:/flexunet-kidney-t2w@champion" --env-manager local -p 5001
    # a file, not -d "$IMG": a large image's base64 exceeds the shell's argument limit
    printf '{"dataframe_split": {"columns": ["image", "overlap"], "data": [["%s", 0.5]]}}' \
      "$(base64 -w0 data/kidney-t2w/mini_test/images/sub-036_scan1_z02.png)" > request.json
    curl -s http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' \
      --data-binary @request.json > response.json
    python -c 'import json, base64; r = json.load(open("response.json"))["predictions"][0]; open("mask.png", "wb").write(base64.b64decode(r["mask_png"])); print(r["width"], r["height"], r["pixels_CKD"])'

`{"dataframe_records": [{"image": "<base64>", "tta": true}, ...]}` and
`{"inputs": {"image": ["<base64>", ...]}}` work too. A bad image or option answers HTTP 400
with a one-line message naming the row. In Python: `mlflow.pyfunc.load_model(uri).predict(
pd.DataFrame({"image": [png_bytes]}))` takes raw bytes (or base64 text).

This is the one serving module that imports mlflow (the `flexunet[mlflow]` extra): the
predictor's models:/ and runs:/ URIs are downloaded by `download` here.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import re
from pathlib import Path
from typing import Any

import mlflow.pyfunc  # this module exists for MLflow; the rest of serving/ does not need it
import numpy as np
from mlflow.exceptions import MlflowException

from common.errors import ImageError, UserError
from serving.settings import TilingSettings

ONNX_ARTIFACT = "onnx"
OPTIONAL_COLUMNS = {"overlap": "double", "tta": "boolean"}
_WHITESPACE = re.compile(rb"\s+")


def _image_bytes(value: Any, row: int) -> bytes:
    """Encoded image bytes from a cell: raw bytes (dataframe_* requests, which MLflow
    base64-decodes for a binary column), or base64 text (`inputs` requests hand it over
    undecoded as bytes; Python callers may pass str). A real image file is never valid
    base64 (PNG, JPEG, TIFF and BMP headers hold non-ASCII bytes), so the test is safe."""
    if isinstance(value, str):
        value = value.encode("ascii", errors="replace")
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise ImageError(f"row {row}: column 'image' must hold encoded image bytes (base64 in JSON), "
                         f"got {type(value).__name__}")
    value = bytes(value)
    try:
        return base64.b64decode(_WHITESPACE.sub(b"", value), validate=True)
    except (binascii.Error, ValueError):
        return value


def decode_image(data: bytes, channels: int, row: int = 0) -> np.ndarray:
    """Encoded image bytes -> (H, W, channels) uint8 by common/imageio's conversion rules."""
    from PIL import Image, UnidentifiedImageError

    from common.imageio import to_uint8_array

    if not data:
        raise ImageError(f"row {row}: column 'image' is empty")
    try:
        with Image.open(io.BytesIO(data)) as img:  # Pillow's decompression-bomb limit applies
            img.load()
            return to_uint8_array(img, channels)
    except Image.DecompressionBombError as exc:
        raise ImageError(f"row {row}: refused as a possible decompression bomb ({exc})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"row {row}: not a readable image ({exc})") from None


def encode_png(image: np.ndarray) -> bytes:
    """uint8 (H, W[, C]) -> PNG bytes: for input examples and clients."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8).squeeze()).save(buf, format="PNG")
    return buf.getvalue()


def _cell(row: Any, column: str) -> Any:
    """A per-row option, None when the column is absent or the cell empty (NaN / None)."""
    value = row.get(column) if hasattr(row, "get") else None
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


def download(uri: str, dst: Path) -> Path:
    """MLflow artifacts of a models:/ or runs:/ URI -> a local folder (serving.predictor's URIs)."""
    # MLFLOW_TRACKING_URI, when set, names the store explicitly: in a process that also
    # logged elsewhere (tests, a notebook), mlflow's global URI would otherwise win.
    # (serving.load.local_model checked, before importing mlflow, that the server answers.)
    store = os.environ.get("MLFLOW_TRACKING_URI") or None
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst), tracking_uri=store,
                                                        registry_uri=store))
    except (MlflowException, OSError) as exc:
        where = store or mlflow.get_tracking_uri()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{uri}: cannot download the model from MLflow at {where} ({first}); "
                        f"check the name, version/alias and MLFLOW_TRACKING_URI") from None


class FlexUNetPyfunc(mlflow.pyfunc.PythonModel):
    """Tiled whole-image segmentation. model_config (all keys optional): TilingSettings
    fields (tile_size, overlap, blend, batch_size, tta, threads, tissue_threshold)."""

    def load_context(self, context) -> None:
        from serving.predictor import TiledPredictor

        config = {k: v for k, v in (context.model_config or {}).items() if k in TilingSettings.names()}
        settings = TilingSettings.from_mapping(config, "model_config")
        self.default = TiledPredictor.from_onnx(context.artifacts[ONNX_ARTIFACT], settings)
        self.card = self.default.card

    def _predictor(self, row: int, overlap: Any, tta: Any):
        """The default predictor, or one with this row's overlap/tta sharing its onnxruntime
        session (cheap to build; nothing cached, so odd client values cannot pile up sessions)."""
        from serving.predictor import TiledPredictor

        d = self.default
        changes = {k: v for k, v in (("overlap", overlap), ("tta", None if tta is None else bool(tta)))
                   if v is not None}
        try:
            settings = d.settings.replace(**changes)
        except UserError as exc:
            raise UserError(f"row {row}: {exc}") from None
        if settings == d.settings:
            return d
        return TiledPredictor(d.session, d.card, settings, source=d.source)

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        import pandas as pd

        if "image" not in getattr(model_input, "columns", []):
            raise MlflowException.invalid_parameter_value(
                "request needs a column 'image' (base64-encoded PNG/JPEG/TIFF bytes)")
        try:
            rows = [self._predict_row(i, row) for i, (_, row) in enumerate(model_input.iterrows())]
        except UserError as exc:  # -> HTTP 400 with our one-line message, not a 500
            raise MlflowException.invalid_parameter_value(str(exc)) from None
        return pd.DataFrame(rows, columns=output_columns(self.card.class_names))

    def _predict_row(self, i: int, row: Any) -> dict[str, Any]:
        from common.imageio import palette_image

        image = decode_image(_image_bytes(row["image"], i), self.card.channels, i)
        ids = self._predictor(i, _cell(row, "overlap"), _cell(row, "tta")).predict(image)
        buf = io.BytesIO()
        palette_image(ids, self.card.colours).save(buf, format="PNG")
        counts = np.bincount(ids.ravel(), minlength=self.card.num_classes)
        return {"mask_png": base64.b64encode(buf.getvalue()).decode("ascii"),
                "height": int(ids.shape[0]), "width": int(ids.shape[1]),
                **{f"pixels_{n}": int(c) for n, c in zip(self.card.class_names, counts)}}


def output_columns(class_names: list[str]) -> list[str]:
    return ["mask_png", "height", "width", *[f"pixels_{n}" for n in class_names]]


def signature(class_names: list[str]):
    """The served model's signature: binary `image` (base64 in JSON), optional overlap/tta."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema

    inputs = Schema([ColSpec(DataType.binary, "image"),
                     *[ColSpec(t, c, required=False) for c, t in OPTIONAL_COLUMNS.items()]])
    outputs = Schema([ColSpec(DataType.string, "mask_png"), ColSpec(DataType.long, "height"),
                      ColSpec(DataType.long, "width"),
                      *[ColSpec(DataType.long, f"pixels_{n}") for n in class_names]])
    return ModelSignature(inputs=inputs, outputs=outputs)


def input_example(image: np.ndarray):
    """A one-row request holding `image` as PNG bytes (MLflow stores it base64-encoded)."""
    import pandas as pd

    return pd.DataFrame({"image": [encode_png(image)]})
