"""The schema of params.yaml: every section, and every default (the defaults are the
values params.yaml ships with; tests/unit/config/test_schema.py holds them equal).

Loading and error messages live in pipeline.config.load."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Literal, get_type_hints

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, create_model, field_validator,
                      model_validator)

from pipeline.config.search_space import (
    TUNABLE, Categorical, Dimension, FloatRange, IntRange, apply_values, check_odd_kernels, extremes,
)
from serving.settings import SettingsError, TilingSettings, check_setting

RGB = tuple[int, int, int]
_RGB_KEY = re.compile(r"^\s*\(?\s*(\d{1,3})\s*,\s*(\d{1,3})\s*,\s*(\d{1,3})\s*\)?\s*$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SplitFractions(_Section):
    train: float = Field(0.7, gt=0, lt=1)
    valid: float = Field(0.15, gt=0, lt=1)
    test: float = Field(0.15, gt=0, lt=1)

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitFractions:
        total = self.train + self.valid + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + valid + test must be 1.0, got {total:g}")
        return self


# params.yaml `dataset.nifti`: how the kidney-nifti source reads the real T2W kidney set.
#
# Filename rule (documented in docs/data.md, "Real data"): image volumes are `<raw>/<images_dir>/<stem>.nii`
# or `.nii.gz`; each has a mask volume `<raw>/<masks_dir>/<stem><mask_suffix>.nii[.gz]`.
# `scan_pattern` (a regular expression with the named groups `subject` and, optionally,
# `scan`) is matched against the image stem to find the subject (a CSV row) and the scan
# number of repeat scans. The CSV `<raw>/<subjects_csv>` has one row per subject with the
# columns `id_column` and `group_column`; a group's text (case-insensitive) is looked up
# in `groups`, which maps it to a class name of `mask.class_names`.
class NiftiParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    images_dir: str = "images"
    masks_dir: str = "masks"
    mask_suffix: str = ""
    subjects_csv: str = "subjects.csv"
    id_column: str = "subject_id"
    group_column: str = "group"
    scan_pattern: str = r"^(?P<subject>[A-Za-z0-9-]+?)(?:_(?:scan)?(?P<scan>\d+))?$"
    groups: dict[str, str] = Field(default_factory=lambda: {
        "ckd": "CKD", "chronic kidney disease": "CKD", "patient": "CKD",
        "healthy": "healthy", "healthy control": "healthy", "healthy volunteer": "healthy",
        "hv": "healthy", "control": "healthy",
    })
    # Slicing plane after reorienting every volume to RAS (nibabel's closest canonical).
    slice_axis: Literal["coronal", "axial", "sagittal"] = "coronal"
    # Per-volume intensity normalisation: clip to these percentiles, scale to 0..255.
    intensity_percentiles: tuple[float, float] = (0.5, 99.5)
    # Values a kidney mask volume may hold (0 background; any other listed value = kidney,
    # e.g. 1 and 2 for left and right). Anything else is an error naming the file.
    mask_labels: list[int] = Field(default_factory=lambda: [0, 1, 2])

    @field_validator("scan_pattern")
    @classmethod
    def _has_subject_group(cls, value: str) -> str:
        try:
            compiled = re.compile(value)
        except re.error as exc:
            raise ValueError(f"is not a regular expression: {exc}") from None
        if "subject" not in compiled.groupindex:
            raise ValueError("needs a named group 'subject', e.g. ^(?P<subject>[A-Za-z0-9]+)_(?P<scan>\\d+)$")
        return value

    @field_validator("groups")
    @classmethod
    def _lower_keys(cls, value: dict[str, str]) -> dict[str, str]:
        return {k.strip().lower(): v for k, v in value.items()}

    @model_validator(mode="after")
    def _percentiles(self) -> NiftiParams:
        low, high = self.intensity_percentiles
        if not 0 <= low < high <= 100:
            raise ValueError(f"intensity_percentiles must satisfy 0 <= low < high <= 100, got {(low, high)}")
        if 0 not in self.mask_labels:
            raise ValueError("mask_labels must include 0 (background)")
        return self


# params.yaml `dataset.randomise`: SynthSeg-style domain randomisation of the synthetic
# kidney-t2w slices (pipeline.data.synthetic.randomise; docs/data.md). Ranges follow
# SynthSeg's defaults (Billot et al. 2023) mapped to 2-D slices in mm and 0..1 signal.
class RandomiseParams(_Section):
    splits: list[Literal["train", "valid", "test"]] = Field(default_factory=lambda: ["train", "valid"])
    realistic_fraction: float = Field(0.5, ge=0, le=1)   # slices keeping the T2w-like rendering (docs/data.md)
    rotation_deg: float = Field(15.0, ge=0, le=180)      # SynthSeg rotation_bounds 15
    scaling: float = Field(0.15, ge=0, lt=1)             # SynthSeg 0.2; coronal MRI FOVs vary less
    shear: float = Field(0.012, ge=0, lt=1)              # SynthSeg shearing_bounds
    elastic_mm: float = Field(6.0, ge=0)                 # SynthSeg nonlin_std 4 voxels
    mean_max: float = Field(0.9, gt=0, le=1)             # SynthSeg 0..225 of 255
    std_max: float = Field(0.1, ge=0)                    # SynthSeg 0..25 of 255
    bias_std: float = Field(0.5, ge=0)                   # SynthSeg 0.7 in 3-D
    resolution_max: float = Field(2.5, ge=1)
    noise_max: float = Field(0.05, ge=0)
    gamma_std: float = Field(0.4, ge=0)                  # SynthSeg 0.5


# params.yaml `dataset.stain`: domain randomisation of the synthetic glomeruli tiles for
# stain and scanner (pipeline.data.synthetic.stain; docs/data.md), lengths in µm.
class StainParams(_Section):
    splits: list[Literal["train", "valid", "test"]] = Field(default_factory=lambda: ["train", "valid"])
    realistic_fraction: float = Field(0.2, ge=0, le=1)   # draws keeping the typical PAS colours
    random_labels: float = Field(0.3, ge=0, le=1)        # of the others: every label's stain amounts drawn anew
    stain_angle_deg: float = Field(10.0, ge=0, le=45)    # stain vectors turned in OD space
    stain_scale: float = Field(0.35, ge=0, lt=1)         # each stain's amount x (1 +/- this)
    stain_shift: float = Field(0.1, ge=0)                # ... + (-this..this) OD
    label_jitter: float = Field(0.25, ge=0)              # every label's amounts x exp(N(0, this))
    blur_um: float = Field(2.0, ge=0)                    # focus blur sigma up to this
    noise_max: float = Field(0.04, ge=0)                 # Gaussian noise up to this of full scale
    brightness: float = Field(0.08, ge=0)
    contrast: float = Field(0.2, ge=0, lt=1)
    gamma_std: float = Field(0.25, ge=0)
    jpeg_quality_min: int = Field(40, ge=1, le=100)      # half the draws JPEG-compressed at quality >= this; 100: none
    scale_jitter: float = Field(0.2, ge=0, lt=1)         # anatomy drawn at mpp x (1 +/- this)
    elastic_um: float = Field(12.0, ge=0)                # max smooth displacement


class DatasetParams(_Section):
    name: Literal["kidney-t2w", "glomeruli"] = "kidney-t2w"
    # synthetic: the embedded generator. Real data, read from `raw`: imagemask (the seed's
    # <raw>/{train,valid,test}/{images,masks} layout), kidney-nifti (the T2W kidney NIfTI
    # set, see `nifti`), glomeruli-png (whole images + masks, cut into model-size tiles).
    source: Literal["synthetic", "imagemask", "kidney-nifti", "glomeruli-png"] = "synthetic"
    raw: str = "data/raw/kidney-t2w"   # the raw data folder (relative to the project root), for the real sources
    root: str = "data"
    image_size: int = Field(128, ge=16, le=4096)
    seed: int = 137
    # kidney-t2w: subjects -> 3-D scans -> 2-D slices
    num_subjects: int = Field(96, ge=3)
    slices_per_scan: int = Field(8, ge=1)
    slice_mm: float = Field(5.0, ge=0.5, le=20)     # distance between the synthetic slices' centres
    repeat_fraction: float = Field(0.1, ge=0, le=1)
    repeat_scans: int = Field(5, ge=2)
    kidney_free_fraction: float = Field(0.5, ge=0, le=1)
    # glomeruli: large images (the real ones are 1024 px) cut into model-size tiles
    num_large_images: int = Field(24, ge=3)
    large_image_factor: int = Field(2, ge=1, le=16)
    split: SplitFractions = SplitFractions()
    num_mini_test: int = Field(6, ge=1)
    tile_overlap: float = Field(0.0, ge=0, lt=1)   # glomeruli-png: overlap of the training tiles
    # Microns per pixel of the training images, when known: the model card records it, so
    # `flexunet predict` picks the matching level of a whole-slide image (serving.slide).
    mpp: float | None = Field(None, gt=0)
    nifti: NiftiParams = NiftiParams()
    # synthetic kidney-t2w: randomised (each slice of the `randomise.splits` rendered from its
    # tissue label map with a new random contrast, deformation, bias, resolution, noise and
    # gamma: SynthSeg-style domain randomisation) | realistic (one fixed T2w-like rendering)
    appearance: Literal["realistic", "randomised"] = "randomised"
    randomise: RandomiseParams = RandomiseParams()
    stain: StainParams = StainParams()                # synthetic glomeruli, randomised appearance

    @model_validator(mode="after")
    def _source_fits_name(self) -> DatasetParams:
        fits = {"kidney-nifti": "kidney-t2w", "glomeruli-png": "glomeruli"}
        if self.source in fits and self.name != fits[self.source]:
            raise ValueError(f"source {self.source!r} makes the {fits[self.source]!r} dataset; set name: {fits[self.source]}")
        return self

    @property
    def path(self) -> Path:
        return Path(self.root) / self.name


class MaskParams(_Section):
    # The kidney-t2w colours: Chronic_Kidney_Disease red, Healthy_Control green.
    rgb_map: dict[RGB, int] = Field(default_factory=lambda: {(0, 0, 0): 0, (255, 0, 0): 1, (0, 255, 0): 2})
    class_names: list[str] = Field(default_factory=lambda: ["background", "CKD", "healthy"])
    # How a mask colour not in rgb_map is read (pipeline/data/masks.py): exact: an error;
    # tolerance: snapped to its nearest map colour if within color_tolerance (Euclidean
    # RGB distance) of a blend, a mix of two or three map colours (the class borders of
    # a resized mask), else an error; nearest: every pixel snapped to its nearest map colour.
    color_mode: Literal["exact", "tolerance", "nearest"] = "exact"
    color_tolerance: float = Field(0.0, ge=0, le=255)   # color_mode: tolerance only
    # The foreground class is a property of the whole image (kidney-t2w: the subject's
    # diagnosis), so all foreground pixels of a prediction get one class (serving.labels).
    single_foreground_class: bool = True

    @field_validator("rgb_map", mode="before")
    @classmethod
    def _parse_colours(cls, value: Any) -> Any:
        if not isinstance(value, dict) or not value:
            raise ValueError("must be a non-empty mapping like {'(0,0,0)': 0, '(255,0,0)': 1}")
        parsed: dict[RGB, Any] = {}
        for key, class_id in value.items():
            colour = _parse_rgb(key)
            if colour in parsed:
                raise ValueError(f"colour {colour} is listed twice")
            parsed[colour] = class_id
        return parsed

    @model_validator(mode="after")
    def _ids_are_contiguous(self) -> MaskParams:
        ids = list(self.rgb_map.values())
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"rgb_map: class id(s) {dupes} used by more than one colour")
        if sorted(ids) != list(range(len(ids))):
            raise ValueError(f"rgb_map: class ids must be 0..{len(ids) - 1}, got {sorted(ids)}")
        if len(self.class_names) != len(ids):
            raise ValueError(
                f"class_names has {len(self.class_names)} names for {len(ids)} rgb_map colours"
            )
        if self.color_mode == "tolerance" and self.color_tolerance == 0:
            raise ValueError("color_mode: tolerance needs color_tolerance > 0 (an RGB distance; "
                             "the unknown-colour error names the value that maps every pixel)")
        if self.color_mode != "tolerance" and self.color_tolerance != 0:
            raise ValueError(f"color_tolerance {self.color_tolerance:g} is used only by color_mode: tolerance "
                             f"(now {self.color_mode}); set color_mode: tolerance or color_tolerance: 0")
        return self

    @property
    def colours(self) -> list[RGB]:
        """Colour of each class id, in id order."""
        return [c for c, _ in sorted(self.rgb_map.items(), key=lambda kv: kv[1])]


def _parse_rgb(key: Any) -> RGB:
    if isinstance(key, (list, tuple)) and len(key) == 3:
        rgb = tuple(int(v) for v in key)
    else:
        match = _RGB_KEY.match(str(key))
        if not match:
            raise ValueError(f"colour key {key!r} is not of the form '(R,G,B)'")
        rgb = tuple(int(v) for v in match.groups())
    if any(not 0 <= v <= 255 for v in rgb):
        raise ValueError(f"colour {rgb} has a channel outside 0..255")
    return rgb  # type: ignore[return-value]


class ModelParams(_Section):
    image_width: int = Field(128, ge=8)
    image_height: int = Field(128, ge=8)
    image_channels: Literal[1, 3] = 3
    num_classes: int = Field(3, ge=2)
    base_filters: int = Field(8, ge=1, le=512)
    base_kernels: tuple[int, int] = (3, 3)
    num_layers: int = Field(6, ge=2, le=10)
    dropout_rate: float = Field(0.02, ge=0, lt=0.2)
    dilation: tuple[int, int] = (1, 1)
    normalization: bool = True
    input_normalize: bool = True

    @field_validator("base_kernels")
    @classmethod
    def _odd_kernels(cls, value: tuple[int, int]) -> tuple[int, int]:
        for k in value:
            if k < 1 or k % 2 == 0:
                raise ValueError(f"kernel sizes must be odd and >= 1, got {k} in {value}")
        return value

    @field_validator("dilation")
    @classmethod
    def _positive_dilation(cls, value: tuple[int, int]) -> tuple[int, int]:
        if min(value) < 1:
            raise ValueError(f"dilation must be >= 1, got {value}")
        return value

    @model_validator(mode="after")
    def _size_fits_depth(self) -> ModelParams:
        # dropout_rate * level must stay a valid rate at the deepest level.
        if self.dropout_rate * (self.num_layers - 1) >= 1:
            raise ValueError(
                f"dropout_rate {self.dropout_rate} x deepest level {self.num_layers - 1} >= 1"
            )
        factor = 2 ** (self.num_layers - 1)
        for name in ("image_width", "image_height"):
            size = getattr(self, name)
            if size % factor:
                raise ValueError(
                    f"{name} {size} is not divisible by 2^(num_layers-1) = {factor}; "
                    f"use a multiple of {factor} or fewer layers"
                )
        return self

    @property
    def size_multiple(self) -> int:
        return 2 ** (self.num_layers - 1)


class AugmentParams(_Section):
    flip: bool = True
    rot90: bool = False
    max_rotation_deg: float = Field(5.0, ge=0, le=45)
    max_zoom: float = Field(0.05, ge=0, lt=0.5)
    max_shift: float = Field(0.03, ge=0, lt=0.5)
    brightness: float = Field(0.08, ge=0, le=0.5)
    contrast: float = Field(0.1, ge=0, le=0.5)


class TrainParams(_Section):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(4, ge=1)
    # The seed kept learning_rate and loss under [model]; they live here so that
    # `dvc exp run -S train.learning_rate=...` reruns train and what follows only.
    learning_rate: float = Field(2e-3, gt=0, lt=1)
    loss: Literal["categorical_crossentropy", "dice", "ce_dice"] = "ce_dice"
    clipvalue: float = Field(0.5, gt=0)
    # mixed_bfloat16: convolutions in bfloat16 (float32 weights and softmax), ~1.4x faster
    # training on CPUs with AVX512-BF16/AMX; auto picks it when /proc/cpuinfo shows them
    # (so auto depends on the machine). The saved model is float32 in every case.
    precision: Literal["float32", "mixed_bfloat16", "auto"] = "float32"
    # Early stopping on val_loss after this many epochs without improvement; null = run
    # all `epochs` (a plateau decided by rounding could end training at different epochs
    # on different machines).
    patience: int | None = Field(None, ge=1)
    # Which weights the stage saves: last (the final epoch) or best (lowest val_loss, the
    # seed's ModelCheckpoint; which epoch wins can differ between machines by rounding).
    keep_weights: Literal["last", "best"] = "last"
    # constant (the seed: Adam at a fixed rate, ReduceLROnPlateau if enabled) or cosine
    # (per-step decay over `epochs` to learning_rate * min_lr_fraction, after
    # warmup_epochs of linear warm-up): a schedule fixed in advance, the same everywhere.
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    warmup_epochs: float = Field(1.0, ge=0)
    min_lr_fraction: float = Field(0.02, ge=0, le=1)
    learning_rate_reducer: bool = False
    reducer_factor: float = Field(0.5, gt=0, lt=1)
    reducer_patience: int = Field(3, ge=1)
    epoch_change_infer: bool = True
    num_infer_images: int = Field(6, ge=1)
    # The seed's epoch_change_tiled_infer: the whole (large) mini_test images predicted by
    # the tiler every epoch, logged like the plain one.
    epoch_change_tiled_infer: bool = False
    seed: int = 137
    # Opt-in time guard for shared machines: stop after this many minutes of fitting. The
    # run is then tagged in MLflow and metrics/train.json says so. null = no limit.
    max_minutes: float | None = Field(None, gt=0)
    # Train with the tune stage's best values (tune/best_params.yaml) over the ones here.
    use_tuned_params: bool = True
    # TensorFlow's oneDNN kernels. false: TF's portable Eigen kernels, the code every
    # x86-64 CPU runs alike (and what TF itself uses on AVX2-only CPUs), so the same params
    # give the same model on any machine. true: oneDNN where TF enables it (AVX512-VNNI,
    # AVX512-BF16, AMX): faster there, but its rounding differs from other machines'.
    onednn: bool = False
    # The decoded train/valid splits: memory (decode once), files (re-read every batch),
    # auto (memory up to 2 GiB of decoded pixels). The batches are identical either way.
    cache: Literal["auto", "memory", "files"] = "auto"
    # Resume a killed training at its last completed epoch (state in checkpoints/train/).
    resume: bool = True
    # Fine-tuning: start from the weights of a trained model of the same architecture
    # instead of random ones: a .keras file (relative to the project root) or an MLflow URI
    # (models:/<name>@<alias>, models:/<name>/<version>: the registered version's training
    # run's Keras model; runs:/<run id>/model). null = random initialisation. Tune trials
    # ignore it (they compare architectures, which a fixed start would not fit).
    init_from: str | None = Field(None, min_length=1)
    augment: AugmentParams = AugmentParams()

    @model_validator(mode="after")
    def _one_lr_controller(self) -> TrainParams:
        if self.lr_schedule == "cosine" and self.learning_rate_reducer:
            raise ValueError("lr_schedule 'cosine' and learning_rate_reducer both set the learning rate; "
                             "set learning_rate_reducer: false or lr_schedule: constant")
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs {self.warmup_epochs} must be below epochs {self.epochs}")
        return self


class EvaluateParams(_Section):
    batch_size: int = Field(8, ge=1)
    num_panels: int = Field(6, ge=1)
    # Quality floors: under one, evaluate warns (metrics/eval.json, MLflow); which one also
    # bars a model from champion is register's alias rule (docs/serving.md).
    min_dice: float = Field(0.75, ge=0, le=1)        # test split mean foreground Dice
    min_real_dice: float = Field(0.5, ge=0, le=1)    # real-sample Dice: kidney, or glomerulus (pooled pixels)
    # glomeruli: real-sample object F1 (IoU >= 0.5) a champion needs besides min_real_dice; null = none
    min_real_object_f1: float | None = Field(None, ge=0, le=1)
    # Object-level scores next to the pixel ones (pipeline/scoring/objects.py): detection
    # (objects matched at IoU >= 0.5: precision, recall, F1; glomeruli) | components
    # (predicted components beyond a slice's two largest: two kidneys per slice) | none.
    object_metrics: Literal["detection", "components", "none"] = "components"
    # The real development sample (a folder of images/ and masks/, relative to the project
    # root) scored after every run; null = skip. kidney-t2w: whole slices, by evaluate
    # (pipeline/scoring/real_sample.py) and evaluate_tiled; glomeruli: whole tiles, by
    # evaluate_tiled through `flexunet predict` (pipeline/scoring/real_tiles.py).
    real_sample: str | None = Field("data/real-sample/kidney-t2w", min_length=1)
    # Pixel size of the real sample's images in the model card's unit (um for histology),
    # which their files do not record: a tiled model resamples them to its training
    # resolution (`flexunet predict --spacing`); null = tiled as they are.
    real_sample_spacing: float | None = Field(None, gt=0)
    # Volume rules (serving/kidneys.py): kidney components smaller than this are dropped in
    # evaluate's TKV and, through the model card, by `flexunet predict` on scans.
    min_component_ml: float = Field(5.0, ge=0)

    def champion_floor(self, real_scored: bool) -> tuple[str, float]:
        """(key, value) of the Dice floor that bars a model from champion: the real sample's
        when the model was scored on it (that score picks the champion), else the test split's.
        A glomeruli model scored on the real sample also needs min_real_object_f1, when set."""
        return ("min_real_dice", self.min_real_dice) if real_scored else ("min_dice", self.min_dice)


class ExportParams(_Section):
    opset: int = Field(17, ge=13, le=18)          # tf2onnx 1.17 refuses 19+
    parity_max_abs: float = Field(1e-4, gt=0)     # max |p_tf - p_onnx| on the test images
    parity_min_agreement: float = Field(0.9999, gt=0, le=1)  # argmax agreement
    quantize_int8: bool = False                   # also write an int8 model and compare it
    # How many top levels run on 2x2 space-to-depth phases (pipeline/model/space_to_depth.py): the
    # same function, faster when those levels are too narrow for onnxruntime's channel blocks.
    # auto: as many as its cost model says pay off (2 for the CPU default); 0: off.
    space_to_depth: int | Literal["auto"] = "auto"

    @field_validator("space_to_depth", mode="before")
    @classmethod
    def _levels_or_auto(cls, value: Any) -> Any:
        # YAML true/false would pass as 1/0: say what the key takes instead
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            return value
        raise ValueError(f"{value!r}: a number of levels (0 = off, 1, 2, ...) or auto")


class RegisterParams(_Section):
    model_name: str = Field("flexunet-kidney-t2w", min_length=1)
    champion_alias: str = "champion"
    challenger_alias: str = "challenger"


class _PredictSection(_Section):
    """params.yaml `predict`: the predictor's knobs, serving.settings.TilingSettings's fields
    (types, defaults and rules declared there once), and seam_width."""

    @field_validator(*TilingSettings.names(), check_fields=False)
    @classmethod
    def _tiling_rule(cls, value: Any, info: ValidationInfo) -> Any:
        try:
            return check_setting(info.field_name, value)
        except SettingsError as exc:
            raise ValueError(exc.problem) from None

    def tiling(self) -> TilingSettings:
        """The predictor's settings: this section without seam_width."""
        return TilingSettings(**self.model_dump(include=set(TilingSettings.names())))


_TILING_HINTS = get_type_hints(TilingSettings)
PredictParams = create_model(
    "PredictParams", __base__=_PredictSection, __module__=__name__,
    **{f.name: (_TILING_HINTS[f.name], f.default) for f in dataclasses.fields(TilingSettings)},
    # px either side of an inner window border counted as seam in evaluate_tiled's seam Dice:
    # an evaluation setting, not a predictor knob
    seam_width=(int, Field(8, ge=1)),
)


class MlflowParams(_Section):
    # null -> $MLFLOW_TRACKING_URI, else sqlite:///<project root>/mlflow.db.
    tracking_uri: str | None = None
    experiment_name: str = "flexunet-kidney-t2w"
    log_model: bool = True


# params.yaml `tune`: study settings and the search space (entries: pipeline.config.search_space).
class TuneParams(_Section):
    # Study name prefix: the stored study is '<study_name>-<objective hash>' (pipeline.stages.tune),
    # so changing what a trial means starts a new study instead of mixing results.
    study_name: str = Field("flexunet-kidney-t2w", min_length=1)
    # A journal file (path, relative to the project root; safe for several processes on
    # one machine) or an RDB URL (sqlite:///optuna.db, postgresql://user@host/db) for
    # several machines, where heartbeats mark a dead worker's trial failed.
    storage: str = "optuna/flexunet.journal"
    n_trials: int = Field(3, ge=1)                   # the study's total (complete + pruned), over all workers
    # Opt-in time guard, per worker: no trial starts that would not end by then. Off by
    # default: a study's result must not depend on the machine's speed.
    timeout_minutes: float | None = Field(None, gt=0)
    # Cost cap: a proposal whose model needs more forward GFLOP per image is pruned
    # untrained (and not counted in n_trials). It bounds every trial and the final
    # training with the best values, in FLOPs, whatever the machine.
    max_gflop_per_image: float | None = Field(0.5, gt=0)
    epochs_per_trial: int = Field(3, ge=1)
    train_subset: int | None = Field(128, ge=1)      # train images per trial (a seeded sample); null = all
    seed: int = 137                                  # TPE sampler seed (plus the worker number)
    startup_trials: int = Field(3, ge=1)             # TPE: random trials before it models the space
    pruner: Literal["median", "hyperband", "none"] = "none"
    pruner_startup_trials: int = Field(2, ge=0)      # median: trials before pruning starts
    pruner_warmup_epochs: int = Field(1, ge=0)       # epochs of a trial before it can be pruned
    heartbeat_seconds: int = Field(30, ge=1)         # RDB storages: liveness signal of a running trial
    enqueue_current: bool = True                     # trial 0 = the current params.yaml values
    search_space: dict[str, Dimension] = Field(default_factory=lambda: {
        "base_filters": Categorical(type="categorical", choices=[6, 8]),
        "base_kernels": IntRange(type="int", low=3, high=5, step=2),
        "learning_rate": FloatRange(type="float", low=1e-3, high=4e-3, log=True),
    })

    @field_validator("search_space")
    @classmethod
    def _known_and_sound(cls, space: dict[str, Any]) -> dict[str, Any]:
        if not space:
            raise ValueError("is empty: name at least one of " + ", ".join(TUNABLE))
        for name, dim in space.items():
            if name not in TUNABLE:
                raise ValueError(f"'{name}' cannot be tuned; tunable: {', '.join(TUNABLE)}")
            if name == "base_kernels":
                check_odd_kernels(dim)
        return space


class Params(_Section):
    dataset: DatasetParams = DatasetParams()
    mask: MaskParams = MaskParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    export: ExportParams = ExportParams()
    registry: RegisterParams = RegisterParams()  # `register` would shadow BaseModel.register
    predict: PredictParams = PredictParams()
    mlflow: MlflowParams = MlflowParams()
    tune: TuneParams = TuneParams()

    @model_validator(mode="after")
    def _sections_agree(self) -> Params:
        if self.model.num_classes != len(self.mask.rgb_map):
            raise ValueError(
                f"model.num_classes is {self.model.num_classes} but mask.rgb_map has "
                f"{len(self.mask.rgb_map)} colours"
            )
        self._search_space_fits()
        self._cheapest_trial_fits()
        if self.train.warmup_epochs >= self.tune.epochs_per_trial:
            raise ValueError(f"train.warmup_epochs {self.train.warmup_epochs} must be below "
                             f"tune.epochs_per_trial {self.tune.epochs_per_trial} (a trial runs the same schedule)")
        if self.train.augment.rot90 and self.model.image_width != self.model.image_height:
            raise ValueError(f"train.augment.rot90 needs square images; the model takes "
                             f"{self.model.image_width}x{self.model.image_height}")
        size = self.dataset.image_size
        if (self.model.image_width, self.model.image_height) != (size, size):
            raise ValueError(
                f"dataset.image_size {size} must equal model.image_width/image_height "
                f"({self.model.image_width}x{self.model.image_height})"
            )
        return self

    def _cheapest_trial_fits(self) -> None:
        """tune.max_gflop_per_image must leave something to train: the cheapest model the
        search space can sample has to fit under it."""
        from pipeline.model.architecture import forward_flops

        cap = self.tune.max_gflop_per_image
        if cap is None:
            return
        cheapest = {name: min(v for v in extremes(dim) if isinstance(v, (int, float)))
                    for name, dim in self.tune.search_space.items()
                    if name in ("base_filters", "base_kernels", "num_layers")}
        raw = apply_values({"model": self.model.model_dump(mode="python")}, cheapest)
        gflop = forward_flops(ModelParams.model_validate(raw["model"])) / 1e9
        if gflop > cap:
            raise ValueError(f"tune.max_gflop_per_image {cap}: even the cheapest model of the search space "
                             f"({cheapest}) needs {gflop:.3f} GFLOP per image; raise the cap or narrow the space")

    def _search_space_fits(self) -> None:
        """Every bound or choice of tune.search_space must make a valid model/train setting
        (a kernel, depth or rate the model would reject is a load-time error, not a
        failed trial an hour into a study)."""
        sections = {"model": (ModelParams, self.model), "train": (TrainParams, self.train)}
        for name, dim in self.tune.search_space.items():
            cls, current = sections[TUNABLE[name]]
            for value in extremes(dim):
                candidate = apply_values({TUNABLE[name]: current.model_dump(mode="python")}, {name: value})
                try:
                    cls.model_validate(candidate[TUNABLE[name]])
                except ValidationError as exc:
                    why = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
                    raise ValueError(f"tune.search_space.{name}: value {value!r} gives an invalid "
                                     f"{TUNABLE[name]} section: {why}") from None

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> scalar values, the form MLflow params and DVC -S use."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict) and any(isinstance(k, tuple) for k in value):
                # rgb_map: colour keys are not valid MLflow param names; keep the seed's form.
                items = sorted(value.items(), key=lambda kv: kv[1])
                out[prefix] = "{" + ", ".join(f"({r},{g},{b}): {v}" for (r, g, b), v in items) + "}"
            elif isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            else:
                out[prefix] = value

        walk("", self.model_dump(mode="python"))
        return out
