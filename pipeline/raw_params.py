"""params.yaml `dataset.nifti`: how the kidney-nifti source reads the real T2W kidney set.

Filename rule (documented in the README): image volumes are `<raw>/<images_dir>/<stem>.nii`
or `.nii.gz`; each has a mask volume `<raw>/<masks_dir>/<stem><mask_suffix>.nii[.gz]`.
`scan_pattern` (a regular expression with the named groups `subject` and, optionally,
`scan`) is matched against the image stem to find the subject (a CSV row) and the scan
number of repeat scans. The CSV `<raw>/<subjects_csv>` has one row per subject with the
columns `id_column` and `group_column`; a group's text (case-insensitive) is looked up
in `groups`, which maps it to a class name of `mask.class_names`.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


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
