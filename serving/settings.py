"""TilingSettings: the knobs of tiled prediction, declared once.

One frozen dataclass carries them from params.yaml's `predict` section (the pipeline's
schema derives its PredictParams from these fields) and from `flexunet predict`'s flags
(generated from the fields' help text) into serving.predictor.TiledPredictor:

    settings = TilingSettings(overlap=0.5, tta=True)          # validated here, once
    predictor = TiledPredictor.from_onnx("models/model.onnx", settings)

Each field's rule lives in its metadata (`check`); a bad value raises a SettingsError:
one line naming the field and the fix, a UserError for the CLI and a ValueError for array
API callers (serving.tiling applies the same rules) and for pydantic. Stdlib only: the
light install reads params.yaml with PyYAML and this class, without pydantic.
"""

from __future__ import annotations

import argparse
import dataclasses
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from common.errors import UserError

BLENDS = ("gaussian", "constant")
MAX_TILE_SIZE = 4096          # a 4096 tile x batch 4 x 3 classes is already ~800 MB of outputs
PAS_TISSUE_THRESHOLD = 220    # the tissue_threshold that suits PAS-stained histology on glass


class SettingsError(UserError, ValueError):
    """A bad setting: `<name> <value>: <problem and fix>` (the CLI shows the flag instead)."""

    def __init__(self, name: str, value: Any, problem: str):
        self.name, self.value, self.problem = name, value, problem
        super().__init__(f"{name} {value!r}: {problem}")

    def as_flag(self) -> str:
        """The same message naming the command-line flag."""
        return f"--{self.name.replace('_', '-')} {self.value!r}: {self.problem}"


# ---------------------------------------------------------------------- one rule per field
# Each takes a value and returns it normalised, or raises ValueError(<problem and fix>).
def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _tile_size(value: Any) -> int | None:
    if value is None:
        return None
    if not _is_int(value) or value < 1:
        raise ValueError("must be a positive integer (px), or unset for the model's training size")
    if value > MAX_TILE_SIZE:
        raise ValueError(f"exceeds the cap of {MAX_TILE_SIZE} px (memory grows with its square); "
                         f"use e.g. {MAX_TILE_SIZE // 4}")
    return int(value)


def _overlap(value: Any) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0.0 <= float(value) < 1.0:
        raise ValueError("must be in [0, 1): the fraction of a window shared with its neighbour, e.g. 0.25")
    return float(value)


def _blend(value: Any) -> str:
    if value not in BLENDS:
        raise ValueError(f"must be one of {', '.join(BLENDS)}")
    return str(value)


def _positive(what: str, unset: str | None = None) -> Callable[[Any], int | None]:
    def check(value: Any) -> int | None:
        if value is None and unset is not None:
            return None
        if not _is_int(value) or value < 1:
            raise ValueError(f"must be a positive integer ({what})" + (f", or unset for {unset}" if unset else ""))
        return int(value)
    return check


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _grey_level(value: Any) -> int | None:
    if value is None:
        return None  # unset: the model card's (the glomeruli model's is PAS_TISSUE_THRESHOLD)
    if not _is_int(value) or not 0 <= value <= 255:
        raise ValueError(f"must be a grey level 1..255 ({PAS_TISSUE_THRESHOLD} suits PAS histology), "
                         f"0 for no background skip, or unset for the model card's")
    return int(value)


def _count_or_unset(value: Any) -> int | None:
    if value is None:
        return None
    if not _is_int(value) or value < 0:
        raise ValueError("must be a pixel count >= 0 (0: keep every object), or unset for the model card's")
    return int(value)


def _spacing(value: Any) -> float | None:
    if value is None:
        return None
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 < float(value) < 1e4:
        raise ValueError("must be a pixel spacing > 0 in the model card's unit (mm for MRI, um for histology), "
                         "or unset for the file's own")
    return float(value)


def _setting(default: Any, help: str, check: Callable[[Any], Any], **flag: Any) -> Any:
    """A field with its one-line help (the CLI flag's) and its rule."""
    return field(default=default, metadata={"help": help, "check": check, "flag": flag})


@dataclass(frozen=True)
class TilingSettings:
    """How TiledPredictor cuts, runs and blends windows (see serving.tiling)."""

    tile_size: int | None = _setting(
        None, "window side in px (unset: the model's training size)", _tile_size, metavar="PX")
    overlap: float = _setting(
        0.25, "fraction of a window shared with its neighbour, in [0, 1)", _overlap, metavar="FRACTION")
    blend: Literal["gaussian", "constant"] = _setting(
        "gaussian", "window weighting: gaussian (borders count least, sigma = tile/8) or constant",
        _blend, choices=BLENDS)
    batch_size: int = _setting(4, "windows per onnxruntime call", _positive("windows per call"), metavar="N")
    tta: bool = _setting(
        False, "flip test-time augmentation with the flips in the model card (2-4x compute)", _flag)
    threads: int | None = _setting(
        None, "onnxruntime intra-op threads (unset: all cores)", _positive("threads", "all cores"), metavar="N")
    tissue_threshold: int | None = _setting(
        None, "skip windows with < 1 % tissue: a nearly grey pixel at least this bright is background "
              f"glass ({PAS_TISSUE_THRESHOLD} suits PAS histology; 0: no skip; unset: the model card's, "
              f"which is {PAS_TISSUE_THRESHOLD} for glomeruli)", _grey_level, metavar="LEVEL")

    min_object_px: int | None = _setting(
        None, "objects (GeoJSON, CSV count, evaluation) smaller than this many pixels are specks and dropped "
              "(0: keep all; unset: the model card's)", _count_or_unset, metavar="PX")

    spacing: float | None = _setting(
        None, "pixel spacing of 2-D inputs whose file does not record it, in the model card's unit: mm for MRI "
              "models, um for histology (a tiled model then tiles them at its training resolution; a scale "
              "outside the trained range is warned about)", _spacing, metavar="MM_OR_UM", type=float)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, check_setting(f.name, getattr(self, f.name)))

    # ------------------------------------------------------------------ construction
    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **changes: Any) -> TilingSettings:
        """A copy with `changes` (field names), validated like any other."""
        unknown = sorted(set(changes) - set(self.names()))
        if unknown:
            raise UserError(f"unknown setting(s) {', '.join(unknown)}; valid: {', '.join(self.names())}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str, ignore: tuple[str, ...] = ()) -> TilingSettings:
        """From a params.yaml `predict` section or a model_config; keys in `ignore` are
        another reader's (the evaluate_tiled stage's seam_width)."""
        unknown = sorted(set(values) - set(cls.names()) - set(ignore))
        if unknown:
            raise UserError(f"{source}: unknown key(s) {', '.join(unknown)}; valid keys: "
                            f"{', '.join(cls.names() + ignore)}")
        try:
            return cls(**{k: v for k, v in values.items() if k in cls.names()})
        except SettingsError as exc:
            raise UserError(f"{source}: {exc}") from None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_setting(name: str, value: Any) -> Any:
    """`value` normalised by field `name`'s rule, or a SettingsError naming both."""
    try:
        return _FIELDS[name].metadata["check"](value)
    except ValueError as exc:
        raise SettingsError(name, value, str(exc)) from None


_FIELDS = {f.name: f for f in dataclasses.fields(TilingSettings)}


# ---------------------------------------------------------------------- command-line flags
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field (--tile-size ...), default None: "not given", so params.yaml's
    value or the field's default applies."""
    for f in dataclasses.fields(TilingSettings):
        flag = dict(f.metadata["flag"])
        if f.default is False:
            flag["action"] = argparse.BooleanOptionalAction
        elif "choices" not in flag and "type" not in flag:   # a None default names its type in the flag
            flag["type"] = float if isinstance(f.default, float) else int
        default = "" if f.default is None or f.default is False else f" (default {f.default})"
        parser.add_argument("--" + f.name.replace("_", "-"), default=None,
                            help=(f.metadata["help"] + default).replace("%", "%%"), **flag)


def from_arguments(args: argparse.Namespace, base: TilingSettings) -> TilingSettings:
    """`base` with the flags given on the command line; a bad value names its flag."""
    given = {name: getattr(args, name) for name in TilingSettings.names() if getattr(args, name, None) is not None}
    try:
        return base.replace(**given)
    except SettingsError as exc:
        raise UserError(exc.as_flag()) from None
