"""The prepare stage writes the seed layout, splits by subject, and is byte-deterministic."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pipeline.data.masks import read_mask
from pipeline.stages.prepare import prepare
from pipeline.layout import Layout
from pipeline.config.load import params_from_dict
from tests.conftest import tiny_dict


def _stems(layout: Layout, split: str) -> list[str]:
    return sorted(p.stem for p in (layout.data_dir / split / "images").iterdir())


def test_kidney_layout_manifest_and_subject_split(layout):
    manifest = prepare(layout)
    for split in ("train", "valid", "test", "mini_test"):
        images, masks = _stems(layout, split), sorted(p.stem for p in (layout.data_dir / split / "masks").iterdir())
        assert images and images == masks
        assert manifest["counts"][split] == len(images)
    subjects = {split: {s.split("_")[0] for s in _stems(layout, split)} for split in ("train", "valid", "test")}
    assert not (subjects["train"] & subjects["valid"]) and not (subjects["train"] & subjects["test"])
    assert not (subjects["valid"] & subjects["test"])
    records = {r["subject_id"]: r for r in manifest["subjects"]}
    assert len(records) == layout.params.dataset.num_subjects
    for split, ids in subjects.items():
        assert all(records[s]["split"] == split for s in ids)
    assert {r["group"] for r in records.values()} == {"CKD", "healthy"}
    assert all(len(r["spacing_mm"]) == 3 and min(r["spacing_mm"]) > 0 for r in records.values())
    assert set(_stems(layout, "mini_test")) <= set(_stems(layout, "test"))
    assert json.loads(layout.manifest.read_text())["fingerprint"] == manifest["fingerprint"]


def test_kidney_masks_are_coloured_by_group(layout):
    manifest = prepare(layout)
    group = {r["subject_id"]: r["group"] for r in manifest["subjects"]}
    seen = set()
    for path in sorted((layout.data_dir / "train" / "masks").iterdir()):
        ids = read_mask(path, layout.params.mask)
        present = set(np.unique(ids).tolist()) - {0}
        expected = {1} if group[path.stem.split("_")[0]] == "CKD" else {2}
        assert present <= expected
        seen |= present
        with Image.open(layout.data_dir / "train" / "images" / path.name) as img:
            assert img.size == (32, 32) and img.mode == "RGB"
    assert seen == {1, 2}


def test_same_seed_same_bytes_other_seed_differs(tmp_path, tiny_params):
    a = prepare(Layout(tmp_path / "a", tiny_params))
    b = prepare(Layout(tmp_path / "b", tiny_params))
    assert a["fingerprint"] == b["fingerprint"]
    first = sorted((tmp_path / "a" / "data" / "kidney-t2w" / "train" / "images").iterdir())[0]
    twin = tmp_path / "b" / "data" / "kidney-t2w" / "train" / "images" / first.name
    assert first.read_bytes() == twin.read_bytes()
    raw = tiny_dict()
    raw["dataset"]["seed"] = 1
    c = prepare(Layout(tmp_path / "c", params_from_dict(raw)))
    assert c["fingerprint"] != a["fingerprint"]


def test_statistics_chart_and_json(layout):
    prepare(layout)
    stats = json.loads((layout.metrics / "dataset.json").read_text())
    assert set(stats["images"]) == {"train", "valid", "test", "mini_test"}
    assert "mask_colours" not in stats   # generated masks: no colours read, none snapped
    for fractions in stats["class_fraction"].values():
        assert sum(fractions) == pytest.approx(1.0, abs=1e-4) and fractions[0] > 0.5
    with Image.open(layout.plots / "dataset_statistics.png") as img:
        assert img.size[0] > 300


def test_glomeruli_tiles_and_whole_mini_test(tmp_path):
    layout = Layout(tmp_path, params_from_dict(tiny_dict("glomeruli")))
    manifest = prepare(layout)
    size = layout.params.dataset.image_size
    large = size * layout.params.dataset.large_image_factor
    with Image.open(next((layout.data_dir / "train" / "images").iterdir())) as tile:
        assert tile.size == (size, size)
    minis = sorted((layout.data_dir / "mini_test" / "images").iterdir())
    assert minis
    for path in minis:
        with Image.open(path) as whole:
            assert whole.size == (large, large)
    per_image = {s.split("_")[0] for split in ("train", "valid", "test") for s in _stems(layout, split)}
    assert len(per_image) == layout.params.dataset.num_large_images
    splits_of = {}
    for split in ("train", "valid", "test"):
        for stem in _stems(layout, split):
            splits_of.setdefault(stem.split("_")[0], set()).add(split)
    assert all(len(s) == 1 for s in splits_of.values()), "tiles of one image in two splits"
    tiles = layout.params.dataset.large_image_factor ** 2
    assert sum(manifest["counts"][s] for s in ("train", "valid", "test")) == tiles * len(per_image)


def test_failed_prepare_leaves_previous_dataset(layout, monkeypatch):
    prepare(layout)
    before = layout.manifest.read_text()
    import pipeline.stages.prepare as prep

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(prep.kidney_t2w, "render_scan", boom)
    with pytest.raises(RuntimeError):
        prepare(layout)
    assert layout.manifest.read_text() == before
    assert not [p for p in layout.data_dir.parent.iterdir() if p.name.startswith(".")]
