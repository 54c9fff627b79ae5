"""serving.objects: pixel-edge polygons of the objects in streamed label bands, and the QuPath
GeoJSON written from them."""

from __future__ import annotations

import json
import math
import uuid

import numpy as np
import pytest
import shapely
from scipy import ndimage

from serving.objects import ObjectTracer, SlideObject, write_geojson

NAMES = ["background", "CKD", "healthy"]
COLOURS = [(0, 0, 0), (255, 0, 0), (0, 255, 0)]


def trace(labels, probs=None, *, bands=None, num_classes=3, unify_to=None, rng=None, **kwargs):
    """Objects of `labels` fed in bands of the given heights (random 1..9 with rng, else one);
    4-connectivity unless told (the stricter case for polygons; predict uses CONNECTIVITY)."""
    kwargs.setdefault("connectivity", 4)
    tracer = ObjectTracer(num_classes, **kwargs)
    row0 = 0
    heights = iter(bands or [])
    while row0 < labels.shape[0]:
        n = int(rng.integers(1, 10)) if rng is not None else next(heights, labels.shape[0] - row0)
        tracer.add_band(row0, labels[row0: row0 + n], None if probs is None else probs[row0: row0 + n])
        row0 += n
    return tracer.objects(unify_to)


def reference(labels, connectivity=4, classes=(1, 2)):
    """(class, pixels) of every connected component, from scipy."""
    structure = np.ones((3, 3)) if connectivity == 8 else None
    out = []
    for c in classes:
        comp, _ = ndimage.label(labels == c, structure=structure)
        out += [(c, int(n)) for n in np.bincount(comp.ravel())[1:]]
    return sorted(out)


def random_labels(rng, h, w, fill):
    fg = rng.random((h, w)) < fill
    return (fg * rng.integers(1, 3, (h, w))).astype(np.uint8)


# --------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("connectivity", [4, 8])
def test_random_masks_match_scipy_components_and_areas_exactly(connectivity):
    rng = np.random.default_rng(connectivity)
    for _ in range(40):
        h, w = (int(v) for v in rng.integers(1, 70, 2))
        labels = random_labels(rng, h, w, rng.uniform(0.2, 0.8))
        objects = trace(labels, rng=rng, connectivity=connectivity)
        assert sorted((o.class_id, o.pixels) for o in objects) == reference(labels, connectivity)
        for o in objects:
            assert o.polygon.is_valid
            assert o.polygon.area == o.pixels            # exact, not just within 2 %
            assert abs(o.polygon.area - o.pixels) <= 0.02 * o.pixels
            if connectivity == 4:
                assert o.polygon.geom_type == "Polygon"


def test_each_polygon_covers_exactly_its_component():
    rng = np.random.default_rng(7)
    labels = random_labels(rng, 40, 50, 0.6)
    comp, n = ndimage.label(labels == 1)
    objects = [o for o in trace(labels, rng=rng) if o.class_id == 1]
    assert len(objects) == n
    for o in objects:
        # A point inside the polygon names its component; the polygon is that component's pixels.
        p = o.polygon.representative_point()
        k = comp[int(p.y), int(p.x)]
        cells = np.argwhere(comp == k)
        pixels = shapely.union_all(shapely.box(cells[:, 1], cells[:, 0], cells[:, 1] + 1, cells[:, 0] + 1))
        assert o.polygon.equals(pixels) and o.pixels == len(cells)


def test_object_across_three_bands_is_one_polygon_equal_to_the_single_band_one():
    labels = np.zeros((30, 20), np.uint8)
    labels[3:27, 4:9] = 1
    labels[12:18, 4:16] = 1      # a cross: its arm lies wholly in the middle band
    labels[25:27, 2:18] = 1      # a foot wider than the stem, in the last band
    whole = trace(labels)
    banded = trace(labels, bands=[10, 10, 10])
    assert len(whole) == len(banded) == 1
    assert banded[0].polygon.equals(whole[0].polygon)
    assert banded[0].pixels == whole[0].pixels == int((labels == 1).sum())
    assert banded[0].polygon.area == banded[0].pixels
    # no vertex left on the band edges where the stem just continues
    xs, ys = np.asarray(banded[0].polygon.exterior.coords).T
    assert not np.any(np.isin(ys, [10, 20]) & np.isin(xs, [4, 9]))


def test_u_shape_whose_arms_meet_in_a_later_band_is_one_object():
    labels = np.zeros((12, 12), np.uint8)
    labels[0:9, 1:3] = 2
    labels[0:9, 8:10] = 2
    labels[9:11, 1:10] = 2       # the arms join only here, two bands below their tops
    objects = trace(labels, bands=[4, 4, 4])
    assert [(o.class_id, o.pixels) for o in objects] == [(2, int((labels == 2).sum()))]
    assert objects[0].polygon.is_valid and not objects[0].polygon.interiors


def test_ring_keeps_its_hole():
    labels = np.zeros((20, 20), np.uint8)
    labels[2:15, 3:17] = 1
    labels[5:10, 6:12] = 0
    (obj,) = trace(labels, bands=[4] * 5)
    assert len(obj.polygon.interiors) == 1
    assert obj.polygon.area == obj.pixels == 13 * 14 - 5 * 6
    assert shapely.Polygon(obj.polygon.interiors[0]).area == 30
    assert obj.polygon.is_valid


def test_diagonal_contact_two_objects_with_4_connectivity_one_multipolygon_with_8():
    labels = np.zeros((4, 4), np.uint8)
    labels[1, 1] = labels[2, 2] = 1
    four = trace(labels, bands=[2, 2])            # the contact lies on the band edge
    assert [(o.polygon.geom_type, o.pixels) for o in four] == [("Polygon", 1), ("Polygon", 1)]
    assert all(o.polygon.is_valid for o in four)
    (eight,) = trace(labels, bands=[2, 2], connectivity=8)
    assert eight.polygon.geom_type == "MultiPolygon" and len(eight.polygon.geoms) == 2
    assert eight.polygon.is_valid and eight.polygon.area == eight.pixels == 2


def test_hole_touching_the_outline_at_a_corner_stays_valid():
    labels = np.array([[1, 1, 1, 0],
                       [1, 0, 1, 0],
                       [1, 1, 0, 0],
                       [0, 0, 0, 0]], np.uint8)
    (obj,) = trace(labels)
    assert obj.polygon.geom_type == "Polygon" and obj.polygon.is_valid
    assert obj.polygon.area == obj.pixels == 7


def test_objects_touching_the_image_edges():
    labels = np.ones((5, 7), np.uint8)
    labels[2] = 2
    objects = trace(labels, bands=[1, 1, 1, 1, 1])
    assert [(o.class_id, o.pixels) for o in objects] == [(1, 14), (1, 14), (2, 7)]
    assert objects[2].polygon.equals(shapely.box(0, 2, 7, 3))


def test_closed_objects_are_finished_band_by_band():
    # Memory follows the open objects: after each band only those touching its bottom row wait.
    tracer = ObjectTracer(2)
    band = np.zeros((8, 32), np.uint8)
    band[2:5, 3:9] = band[1:3, 20:30] = 1
    for i in range(50):
        tracer.add_band(8 * i, band)
        assert not tracer._open and sum(len(done.cls) for done in tracer._done) == 2 * (i + 1)
    bottom = band.copy()
    bottom[6:, 10:12] = 1
    tracer.add_band(400, bottom)
    assert len(tracer._open) == 1
    assert len(tracer.objects()) == 103


# --------------------------------------------------------------------------- classes, probabilities, scale
def test_unify_to_merges_edge_neighbours_of_other_classes_only():
    labels = np.zeros((8, 8), np.uint8)
    labels[1:4, 1:3] = 1
    labels[1:4, 3:5] = 2       # shares an edge with the class-1 block
    labels[5, 6] = 2           # touches nothing
    labels[4, 5] = 1           # touches the class-2 block at a corner only
    separate = trace(labels)
    assert sorted((o.class_id, o.pixels) for o in separate) == [(1, 1), (1, 6), (2, 1), (2, 6)]
    unified = trace(labels, bands=[3, 5], unify_to=2)
    assert sorted((o.class_id, o.pixels) for o in unified) == [(2, 1), (2, 1), (2, 12)]
    big = max(unified, key=lambda o: o.pixels)
    assert big.polygon.geom_type == "Polygon" and big.polygon.equals(shapely.box(1, 1, 5, 4))
    # with 8-connectivity the corner contacts join too: a chain of corner-touching parts
    (joined,) = trace(labels, unify_to=1, connectivity=8)
    assert joined.pixels == 14 and joined.class_id == 1
    assert joined.polygon.geom_type == "MultiPolygon" and joined.polygon.is_valid
    assert joined.polygon.area == 14


def test_unify_to_equals_tracing_the_unified_labels():
    rng = np.random.default_rng(3)
    for connectivity in (4, 8):
        labels = random_labels(rng, 45, 37, 0.55)
        probs = rng.dirichlet(np.ones(3), labels.shape).astype(np.float32)
        unified = trace(labels, probs, rng=rng, unify_to=2, connectivity=connectivity)
        direct = trace(np.where(labels > 0, 2, 0).astype(np.uint8), probs, rng=rng, connectivity=connectivity)
        assert len(unified) == len(direct)
        for a, b in zip(unified, direct):
            assert (a.class_id, a.pixels) == (b.class_id, b.pixels)
            assert a.polygon.equals(b.polygon) and a.polygon.is_valid
            assert a.mean_probability == pytest.approx(b.mean_probability, rel=1e-12)
    with pytest.raises(ValueError, match="unify_to"):
        ObjectTracer(3).objects(unify_to=3)


def test_mean_probability_exact_and_nan_without_probs():
    labels = np.zeros((6, 9), np.uint8)
    labels[0:4, 0:3] = 1        # 12 pixels crossing the band edge at row 3
    labels[1:3, 5:9] = 2        # 8 pixels
    probs = np.zeros(labels.shape + (3,), np.float32)
    probs[..., 1] = np.arange(54, dtype=np.float32).reshape(6, 9) / 64   # exact in float32
    probs[..., 2] = 0.25
    objects = trace(labels, probs, bands=[3, 3])
    one, two = objects
    assert one.mean_probability == np.mean([r * 9 + c for r in range(4) for c in range(3)]) / 64
    assert two.mean_probability == 0.25
    assert all(math.isnan(o.mean_probability) for o in trace(labels, bands=[3, 3]))


def test_mean_probability_of_a_long_run_does_not_drift():
    labels = np.ones((2, 50_000), np.uint8)
    probs = np.zeros(labels.shape + (2,), np.float32)
    probs[..., 1] = np.float32(0.9)
    (obj,) = trace(labels, probs, num_classes=2)
    assert obj.mean_probability == pytest.approx(float(np.float32(0.9)), rel=1e-12)


def test_downsample_scales_coordinates_and_areas():
    labels = np.zeros((6, 6), np.uint8)
    labels[1:3, 2:5] = 1
    (plain,) = trace(labels)
    (scaled,) = trace(labels, downsample=4.0)
    assert scaled.pixels == plain.pixels == 6
    assert scaled.polygon.area == 6 * 16
    assert scaled.polygon.equals(shapely.box(8, 4, 20, 12))
    (odd,) = trace(labels, downsample=1.5)
    assert odd.polygon.area == pytest.approx(6 * 1.5**2)
    assert odd.polygon.bounds == (3.0, 1.5, 7.5, 4.5)


def test_bands_must_be_contiguous_and_consistent():
    tracer = ObjectTracer(3)
    tracer.add_band(0, np.zeros((4, 5), np.uint8))
    with pytest.raises(ValueError, match="expected 4"):
        tracer.add_band(5, np.zeros((4, 5), np.uint8))
    with pytest.raises(ValueError, match="width"):
        tracer.add_band(4, np.zeros((4, 6), np.uint8))
    with pytest.raises(ValueError, match="labels outside"):
        tracer.add_band(4, np.full((4, 5), 3, np.uint8))
    with pytest.raises(ValueError, match="probs"):
        tracer.add_band(4, np.zeros((4, 5), np.uint8), np.zeros((4, 5, 2), np.float32))
    tracer.objects()
    with pytest.raises(RuntimeError):
        tracer.add_band(4, np.zeros((4, 5), np.uint8))


# --------------------------------------------------------------------------- GeoJSON
def test_geojson_has_the_structure_qupath_imports(tmp_path):
    labels = np.zeros((10, 12), np.uint8)
    labels[1:4, 1:5] = 1
    labels[5:9, 6:11] = 2
    labels[6:8, 8:9] = 0
    probs = np.full(labels.shape + (3,), 0.5, np.float32)
    objects = trace(labels, probs, bands=[5, 5])
    path = tmp_path / "out" / "objects.geojson"
    assert write_geojson(path, objects, NAMES, COLOURS, mpp=0.25) == 2
    doc = json.loads(path.read_text())
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == 2
    for feature, obj in zip(doc["features"], objects):
        assert feature["type"] == "Feature"
        assert uuid.UUID(feature["id"]).version == 4
        geometry = feature["geometry"]
        assert geometry["type"] == "Polygon"
        assert shapely.geometry.shape(geometry).equals(obj.polygon)
        assert all(type(v) is int for ring in geometry["coordinates"] for xy in ring for v in xy)
        assert all(ring[0] == ring[-1] for ring in geometry["coordinates"])
        props = feature["properties"]
        assert props["objectType"] == "annotation"
        assert props["classification"] == {"name": NAMES[obj.class_id], "color": list(COLOURS[obj.class_id])}
        m = props["measurements"]
        assert m["area_px"] == obj.pixels and m["area_um2"] == pytest.approx(obj.pixels * 0.0625)
        assert m["mean_probability"] == 0.5
    holed = shapely.geometry.shape(doc["features"][1]["geometry"])
    assert len(holed.interiors) == 1 and holed.area == 18
    assert [p.name for p in tmp_path.joinpath("out").iterdir()] == ["objects.geojson"]


def test_geojson_floats_when_scaled_by_a_fraction_and_null_without_probs(tmp_path):
    labels = np.zeros((4, 4), np.uint8)
    labels[1:3, 1:3] = 1
    objects = trace(labels, downsample=1.5)
    write_geojson(tmp_path / "o.geojson", objects, NAMES, COLOURS)
    (feature,) = json.loads((tmp_path / "o.geojson").read_text())["features"]
    m = feature["properties"]["measurements"]
    assert m == {"area_px": 9, "mean_probability": None}
    assert [1.5, 1.5] in feature["geometry"]["coordinates"][0]


def test_geojson_multipolygon_for_an_8_connected_object(tmp_path):
    labels = np.eye(3, dtype=np.uint8)
    objects = trace(labels, connectivity=8)
    write_geojson(tmp_path / "o.geojson", objects, NAMES, COLOURS)
    (feature,) = json.loads((tmp_path / "o.geojson").read_text())["features"]
    assert feature["geometry"]["type"] == "MultiPolygon"
    assert shapely.geometry.shape(feature["geometry"]).area == 3


def test_empty_image_gives_a_valid_empty_feature_collection(tmp_path):
    objects = trace(np.zeros((300, 40), np.uint8), bands=[128, 128, 44])
    assert objects == []
    path = tmp_path / "empty.geojson"
    assert write_geojson(path, objects, NAMES, COLOURS) == 0
    assert json.loads(path.read_text()) == {"type": "FeatureCollection", "features": []}


def test_unknown_class_fails_before_touching_the_file(tmp_path):
    path = tmp_path / "o.geojson"
    path.write_text("old")
    bad = SlideObject(3, shapely.box(0, 0, 1, 1), 1, 0.5)
    with pytest.raises(ValueError, match="class 3"):
        write_geojson(path, [bad], NAMES, COLOURS)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["o.geojson"]
