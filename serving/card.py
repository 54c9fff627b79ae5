"""The model card an exported ONNX model carries, so serving never re-reads params.yaml.

Export writes it as JSON into the ONNX file's metadata (`metadata_props`, key
`flexunet.card`); the predictor reads it back. Input contract of every exported model:
NHWC float32 holding 0..255 pixel values (the model rescales internally), output NHWK
softmax probabilities.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

METADATA_KEY = "flexunet.card"

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class ModelCard:
    channels: int                 # 1 or 3
    num_classes: int
    size_multiple: int            # 2**(num_layers-1): tile sides must be multiples of this
    tile_size: int                # the training image size: the default tile
    class_names: list[str]
    colours: list[RGB]            # colour of each class id (the seed's rgb_map)
    num_layers: int = 0
    run_id: str | None = None     # MLflow run that trained the model
    dataset: str | None = None
    dataset_fingerprint: str | None = None
    # Flips the model was trained to be invariant to: what flip TTA may use. The default
    # (all) is for cards written before this field; export writes the training's own.
    tta_flips: list[str] = field(default_factory=lambda: ["lr", "ud", "lrud"])
    # One foreground class per image, decided from summed probabilities (serving.labels).
    single_foreground_class: bool = False
    # Background skip for histology (serving.tissue), the default of `flexunet predict`
    # with this model: the glomeruli model skips empty glass unless told otherwise.
    tissue_threshold: int | None = None
    # How an input meets the model (serving.scale): "whole": the whole slice padded to a
    # square and resampled to tile_size, as the kidney models were trained; "tiled": windows
    # at the training resolution (`spacing`), as the glomeruli models were.
    scale: Literal["whole", "tiled"] = "tiled"
    # Pixel spacing of the training images at the model's input, in `spacing_unit`
    # (tiled: the tiles' resolution; whole: the typical field of view / tile_size), and the
    # range the training data covered; None when not known.
    spacing: float | None = None
    spacing_range: tuple[float, float] | None = None
    spacing_unit: Literal["mm", "um"] = "um"
    # Scans (NIfTI, DICOM): the slicing plane after reorienting to RAS and the intensity
    # percentiles mapped to 0..255, as the training slices were cut (serving.scale);
    # None: the model takes 2-D images only.
    plane: Literal["coronal", "axial", "sagittal"] | None = None
    intensity_percentiles: tuple[float, float] = (0.5, 99.5)
    # Volume rules (serving.kidneys): kidney components smaller than this many ml are dropped.
    min_component_ml: float = 0.0
    # Smallest object (pixels) the GeoJSON, the CSV's object count and the evaluation keep.
    min_object_px: int = 0
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def mpp(self) -> float | None:
        """Training resolution in microns per pixel (histology), when known: a slide level is
        chosen to match it, and a mismatch is warned about (serving.inputs)."""
        return self.spacing if self.spacing_unit == "um" else None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        raw = json.loads(text)
        raw["colours"] = [tuple(int(v) for v in c) for c in raw["colours"]]
        if "mpp" in raw and "spacing" not in raw:   # cards exported before `spacing`
            raw.update(spacing=raw["mpp"], spacing_unit="um")
        for key in ("spacing_range", "intensity_percentiles"):
            if raw.get(key) is not None:
                raw[key] = tuple(float(v) for v in raw[key])
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in raw.items() if k in known})


def read_card(path: Path | str) -> ModelCard:
    """The card of an exported ONNX file (KeyError if it has none)."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return ModelCard.from_json(meta[METADATA_KEY])


def sha256_file(path: Path | str) -> str:
    """The file's identity: the registry's "same model" key."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
