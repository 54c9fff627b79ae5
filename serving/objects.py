"""Object polygons from streamed label bands, and the GeoJSON QuPath imports them from.

Why this shape: a slide's label image (50 000 x 50 000 and more) never exists whole; the
tiled predictor hands it over as contiguous bands, top to bottom. ObjectTracer keeps only
what the boundary needs:

- each band's rows are run-length encoded (numpy, all classes at once); runs of one class
  overlapping in consecutive rows are connected (4- or 8-connectivity), labelled by a
  vectorised union-find, and joined to the objects still open at the band's top edge;
- vertically identical runs become rectangles, kept per object with its pixel count and
  summed class probabilities;
- an object with no run in the band's last row is closed: its rectangles become one
  polygon along pixel edges (for blobs with one run per row the ring is built directly,
  for all objects of a band at once; a shapely union otherwise) and only the polygon is
  kept. Objects born and finished within one band never become Python objects before
  objects(): a slide may hold millions of them.

So memory grows with the open objects' rectangles plus the finished polygons (the
foreground's boundary), never with the image area, and an object crossing band edges is
one polygon. Polygons follow pixel edges, so a polygon's area is exactly its pixel count
(times downsample**2 in level-0 units).

Diagonal contacts: with 4-connectivity two pixels touching only at a corner belong to two
objects, so two Polygons (a single Polygon touching itself at a point would be invalid).
With 8-connectivity they are one object whose geometry is a MultiPolygon of parts touching
at points (valid); that is the only case `SlideObject.polygon` is not a Polygon.

The rules the evaluation shares (pipeline/scoring/objects.py): objects are 8-connected
(CONNECTIVITY: a predicted border is a staircase of argmax decisions, and a one-pixel
diagonal link must not split a glomerulus in two), and objects of fewer than
`min_object_px` pixels at the predicted level are specks, not objects (`is_object`;
TilingSettings.min_object_px, the model card's by default).

`objects(unify_to=c)` applies serving.labels' single-foreground-class rule after the last
band, as the predictor does: objects of different foreground classes sharing an edge (any
contact with 8-connectivity) are merged, and the mean probability becomes that of class c.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon

from common.atomic import atomic_path


CONNECTIVITY = 8   # the one connectivity of predicted objects: GeoJSON, CSV counts and evaluation


def is_object(pixels: int | np.ndarray, min_object_px: int) -> bool | np.ndarray:
    """An object is at least min_object_px pixels (at the predicted level); smaller ones are specks."""
    return np.asarray(pixels) >= max(1, min_object_px)


@dataclass(frozen=True)
class SlideObject:
    """One connected object. polygon: level-0 pixel coordinates (x right, y down) along pixel
    edges; a MultiPolygon only for 8-connected parts touching at corners."""

    class_id: int
    polygon: Polygon | MultiPolygon
    pixels: int             # pixel count at the predicted level
    mean_probability: float  # mean of probs[..., class_id] over its pixels; NaN without probs


@dataclass
class _Open:
    """An object still touching the last band's bottom row; coordinates at the predicted level,
    so rectangles, union and merging stay exact integers."""

    class_id: int
    pixels: int = 0
    sums: np.ndarray | None = None                         # (K,) float64 summed probabilities
    rects: list[np.ndarray] = field(default_factory=list)  # (n, 4) int64 x0, y0, x1, y1

    def absorb(self, other: _Open) -> None:
        self.pixels += other.pixels
        self.rects.extend(other.rects)
        if self.sums is not None and other.sums is not None:
            self.sums = self.sums + other.sums


@dataclass
class _Finished:
    """Finished objects, as arrays: most objects open and close within one band, and a
    slide may hold millions, so they are never one Python object each until objects()."""

    cls: np.ndarray      # (m,) int64
    pixels: np.ndarray   # (m,) int64
    sums: np.ndarray | None  # (m, K) float64
    geoms: np.ndarray    # (m,) Polygon | MultiPolygon at the predicted level

    @staticmethod
    def concat(parts: list[_Finished], k: int, with_probs: bool) -> _Finished:
        if not parts:
            return _Finished(np.zeros(0, np.int64), np.zeros(0, np.int64),
                             np.zeros((0, k)) if with_probs else None, np.empty(0, object))
        return _Finished(np.concatenate([p.cls for p in parts]), np.concatenate([p.pixels for p in parts]),
                         np.concatenate([p.sums for p in parts]) if with_probs else None,
                         np.concatenate([p.geoms for p in parts]))


class ObjectTracer:
    """Feed bands with add_band (contiguous, top to bottom), then call objects()."""

    def __init__(self, num_classes: int, *, downsample: float = 1.0, connectivity: int = CONNECTIVITY):
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background and a class), got {num_classes}")
        if connectivity not in (4, 8):
            raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
        if not (downsample > 0 and math.isfinite(downsample)):
            raise ValueError(f"downsample must be a positive number, got {downsample}")
        self.num_classes, self.downsample, self.connectivity = num_classes, float(downsample), connectivity
        self._next_row = 0
        self._width: int | None = None
        self._with_probs: bool | None = None
        self._next_id = 0
        self._open: dict[int, _Open] = {}
        self._done: list[_Finished] = []
        self._finished = False
        # Runs of the last row seen: where the next band's runs attach to open objects.
        self._edge = _Runs.empty()

    # ------------------------------------------------------------------ streaming
    def add_band(self, row0: int, labels: np.ndarray, probs: np.ndarray | None = None) -> None:
        """labels: class ids (rows, W); probs: float (rows, W, K) or None. row0 must be the row
        after the previous band's last."""
        if self._finished:
            raise RuntimeError("objects() already closed this tracer; start a new ObjectTracer")
        labels = np.asarray(labels)
        if labels.ndim != 2:
            raise ValueError(f"labels must be 2-D (rows, W), got shape {labels.shape}")
        rows, width = labels.shape
        if row0 != self._next_row:
            raise ValueError(f"band starts at row {row0}, expected {self._next_row}: bands must be "
                             "contiguous, top to bottom")
        if self._width is None:
            self._width = width
        elif width != self._width:
            raise ValueError(f"band width {width} differs from the first band's {self._width}")
        if self._with_probs is None:
            self._with_probs = probs is not None
        elif self._with_probs != (probs is not None):
            raise ValueError("give probs with every band or with none")
        if probs is not None:
            probs = np.asarray(probs)
            if probs.shape != (rows, width, self.num_classes):
                raise ValueError(f"probs shape {probs.shape}, expected {(rows, width, self.num_classes)}")
        if rows == 0:
            return
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"labels outside 0..{self.num_classes - 1}")
        self._next_row += rows
        runs = _encode_rows(labels, probs)
        self._attach(runs, row0, rows)

    def objects(self, unify_to: int | None = None) -> list[SlideObject]:
        """Every object, sorted by class, then top, then left. Closes the tracer (objects still
        open at the last band are finished); may be called again, e.g. with another unify_to."""
        if not self._finished:
            self._finish(list(self._open))
            self._edge = _Runs.empty()
            self._finished = True
            self._done = [_Finished.concat(self._done, self.num_classes, bool(self._with_probs))]
        done = self._done[0]
        if unify_to is not None:
            if not 1 <= unify_to < self.num_classes:
                raise ValueError(f"unify_to must be a foreground class 1..{self.num_classes - 1}, got {unify_to}")
            done = self._unified(done, unify_to)
        geoms = done.geoms
        if self.downsample != 1.0 and len(geoms):
            geoms = shapely.transform(geoms, lambda c: c * self.downsample)
        if done.sums is not None:
            mean = done.sums[np.arange(len(geoms)), done.cls] / np.maximum(done.pixels, 1)
        else:
            mean = np.full(len(geoms), math.nan)
        bounds = shapely.bounds(geoms).reshape(-1, 4)
        order = np.lexsort((bounds[:, 0], bounds[:, 1], done.cls))
        return [SlideObject(int(done.cls[k]), geoms[k], int(done.pixels[k]), float(mean[k])) for k in order]

    # ------------------------------------------------------------------ internals
    def _attach(self, runs: _Runs, row0: int, rows: int) -> None:
        edge = self._edge
        nc = len(edge)
        cls = np.concatenate([edge.cls, runs.cls])
        row = np.concatenate([np.full(nc, -1, np.int64), runs.row])
        x0 = np.concatenate([edge.x0, runs.x0])
        x1 = np.concatenate([edge.x1, runs.x1])
        u, v = _overlaps(cls, row, x0, x1, self._width, rows, self.connectivity)
        # The edge runs of one open object are one node set even if this band never joins them.
        if nc > 1:
            order = np.argsort(edge.obj, kind="stable")
            same = edge.obj[order[1:]] == edge.obj[order[:-1]]
            u = np.concatenate([u, order[1:][same]])
            v = np.concatenate([v, order[:-1][same]])
        root = _components(len(cls), u, v)

        # A component holding edge runs continues their object(s); several objects merge.
        none = np.iinfo(np.int64).max
        comp_obj = np.full(len(cls), none, np.int64)
        if nc:
            np.minimum.at(comp_obj, root[:nc], edge.obj)
            target = comp_obj[root[:nc]]
            for old, new in {(int(a), int(b)) for a, b in zip(edge.obj, target) if a != b}:
                self._open[new].absorb(self._open.pop(old))
        band_root = root[nc:]
        born = self._next_id
        fresh = np.unique(band_root[comp_obj[band_root] == none])
        comp_obj[fresh] = born + np.arange(len(fresh))
        self._next_id += len(fresh)
        obj = comp_obj[band_root]

        last = runs.row == rows - 1
        self._edge = _Runs(runs.cls[last], runs.row[last], runs.x0[last], runs.x1[last], None, obj[last])
        if len(runs) == 0:
            self._finish(list(self._open))
            return
        open_ids = np.unique(obj[last])

        rects, rect_obj = _rectangles(runs, obj, row0)
        ids, first_run, inv = np.unique(obj, return_index=True, return_inverse=True)
        pixels = np.bincount(inv, weights=runs.x1 - runs.x0, minlength=len(ids)).astype(np.int64)
        sums = None
        if runs.sums is not None:
            sums = np.stack([np.bincount(inv, weights=runs.sums[:, k], minlength=len(ids))
                             for k in range(runs.sums.shape[1])], axis=1)
        id_cls = runs.cls[first_run]
        bounds = np.searchsorted(rect_obj, ids)   # rects are sorted by object: ids[k]'s slice
        bounds = np.append(bounds, len(rect_obj))
        # Continuing or still open objects go through the dict; the rest (most) never do.
        kept = (ids < born) | np.isin(ids, open_ids)
        for k in np.flatnonzero(kept).tolist():
            oid = int(ids[k])
            entry = self._open.get(oid)
            if entry is None:
                entry = self._open[oid] = _Open(int(id_cls[k]), sums=None if sums is None else np.zeros(sums.shape[1]))
            entry.rects.append(rects[bounds[k]: bounds[k + 1]])
            entry.pixels += int(pixels[k])
            if sums is not None:
                entry.sums += sums[k]
        local = np.flatnonzero(~kept)
        dense = np.full(len(ids), -1)
        dense[local] = np.arange(len(local))
        owner = dense[np.searchsorted(ids, rect_obj)]
        mine = owner >= 0
        batch = _Finished(id_cls[local], pixels[local], None if sums is None else sums[local], np.empty(0, object))
        open_set = set(open_ids.tolist())
        self._finish([oid for oid in self._open if oid not in open_set], batch, rects[mine], owner[mine])

    def _finish(self, oids: list[int], batch: _Finished | None = None,
                rects: np.ndarray | None = None, owner: np.ndarray | None = None) -> None:
        """Polygons for `batch` (rectangles `rects` of owner 0..m-1) and the open objects `oids`,
        which leave the dict."""
        k = self.num_classes
        if batch is None:
            batch = _Finished.concat([], k, bool(self._with_probs))
            rects, owner = np.zeros((0, 4), np.int64), np.zeros(0, np.int64)
        closing = [self._open.pop(oid) for oid in oids]
        m = len(batch.cls)
        if closing:
            blocks = [np.concatenate(o.rects) for o in closing]
            rects = np.concatenate([rects] + blocks)
            owner = np.concatenate([owner] + [np.full(len(b), m + i) for i, b in enumerate(blocks)])
            batch = _Finished(
                np.concatenate([batch.cls, [o.class_id for o in closing]]).astype(np.int64),
                np.concatenate([batch.pixels, [o.pixels for o in closing]]).astype(np.int64),
                None if batch.sums is None else np.concatenate([batch.sums, [o.sums for o in closing]]),
                batch.geoms)
        if len(batch.cls):
            batch.geoms = _geometries(rects, owner, len(batch.cls))
            self._done.append(batch)

    def _unified(self, done: _Finished, unify_to: int) -> _Finished:
        geoms, cls = done.geoms, done.cls
        m = len(geoms)
        i, j = shapely.STRtree(geoms).query(geoms, predicate="intersects") if m else (np.zeros(0, int),) * 2
        keep = (i < j) & (cls[i] != cls[j])
        i, j = i[keep], j[keep]
        if self.connectivity == 4 and len(i):
            # Pixel edges shared = 4-adjacent pixels; a common corner point is no contact.
            shared = shapely.length(shapely.intersection(geoms[i], geoms[j])) > 0
            i, j = i[shared], j[shared]
        roots, group = np.unique(_components(m, i, j), return_inverse=True)
        g = len(roots)
        pixels = np.bincount(group, weights=done.pixels, minlength=g).astype(np.int64)
        sums = None
        if done.sums is not None:
            sums = np.stack([np.bincount(group, weights=done.sums[:, k], minlength=g)
                             for k in range(done.sums.shape[1])], axis=1)
        out = np.empty(g, object)
        out[group] = geoms   # right for single members; merged groups are overwritten below
        sizes = np.bincount(group, minlength=g)
        for k in np.flatnonzero(sizes > 1).tolist():
            out[k] = _tidy(shapely.union_all(geoms[group == k]))
        return _Finished(np.full(g, unify_to, np.int64), pixels, sums, out)


# ---------------------------------------------------------------------- runs and components
@dataclass
class _Runs:
    """Horizontal runs of one class: row (band-relative), [x0, x1), summed probabilities (n, K)."""

    cls: np.ndarray
    row: np.ndarray
    x0: np.ndarray
    x1: np.ndarray
    sums: np.ndarray | None = None
    obj: np.ndarray | None = None

    @staticmethod
    def empty() -> _Runs:
        z = np.zeros(0, np.int64)
        return _Runs(z, z, z, z, None, z)

    def __len__(self) -> int:
        return len(self.cls)


def _encode_rows(labels: np.ndarray, probs: np.ndarray | None) -> _Runs:
    """Foreground runs of every class, in row-major order."""
    rows, width = labels.shape
    change = np.empty(labels.shape, bool)
    change[:, 0] = True
    np.not_equal(labels[:, 1:], labels[:, :-1], out=change[:, 1:])
    start = np.flatnonzero(change)
    end = np.append(start[1:], labels.size)   # a row's last run ends where the next row starts
    cls = labels.reshape(-1)[start].astype(np.int64)
    fg = cls != 0
    start, end, cls = start[fg], end[fg], cls[fg]
    row, x0 = np.divmod(start, width)
    sums = None
    if probs is not None:
        k = probs.shape[-1]
        sums = np.zeros((len(start), k))
        if len(start):
            bounds = np.empty(2 * len(start), np.int64)
            bounds[0::2], bounds[1::2] = start, end
            if bounds[-1] == labels.size:   # reduceat sums the last segment to the array's end
                bounds = bounds[:-1]
            # float64: a float32 running sum over a 50 000 px run would drift in the 4th digit
            sums = np.add.reduceat(probs.reshape(-1, k), bounds, axis=0, dtype=np.float64)[0::2]
    return _Runs(cls, row, x0, x0 + (end - start), sums)


def _overlaps(cls: np.ndarray, row: np.ndarray, x0: np.ndarray, x1: np.ndarray,
              width: int, rows: int, connectivity: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (u, v) of runs of one class in consecutive rows that touch: sharing a pixel
    edge (4) or at least a corner (8). Rows start at -1 (the previous band's last row)."""
    if len(cls) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    # One sortable key per (class, row, x); x may be -1..width+1, hence the padding.
    stride = width + 4
    span = (rows + 2) * stride

    def key(c, r, x):
        return c * span + (r + 1) * stride + (x + 1)

    order = np.argsort(cls, kind="stable")   # runs are row-major already: now (class, row, x)
    c, r, a, b = cls[order], row[order], x0[order], x1[order]
    start_key, end_key = key(c, r, a), key(c, r, b)
    reach = 1 if connectivity == 8 else 0
    q = np.flatnonzero(r >= 0)
    # Runs of the row above with x1 > x0 - reach and x0 < x1 + reach: one contiguous slice.
    lo = np.searchsorted(end_key, key(c[q], r[q] - 1, a[q] - reach), side="right")
    hi = np.searchsorted(start_key, key(c[q], r[q] - 1, b[q] + reach), side="left")
    count = np.maximum(hi - lo, 0)
    total = int(count.sum())
    below = np.repeat(q, count)
    above = np.repeat(lo, count) + np.arange(total) - np.repeat(np.cumsum(count) - count, count)
    return order[below], order[above]


def _components(n: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Root (smallest member) of each node's connected component, edges (u, v): union-find
    vectorised as hooking of larger roots under smaller ones plus pointer jumping."""
    parent = np.arange(n)
    while len(u):
        ru, rv = parent[u], parent[v]
        lo, hi = np.minimum(ru, rv), np.maximum(ru, rv)
        active = lo != hi
        if not active.any():
            break
        u, v = u[active], v[active]
        np.minimum.at(parent, hi[active], lo[active])
        while True:   # full compression: every node points at a root again
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    return parent


# ---------------------------------------------------------------------- polygons
def _rectangles(runs: _Runs, obj: np.ndarray, row0: int) -> tuple[np.ndarray, np.ndarray]:
    """Rectangles (x0, y0, x1, y1; image rows) and their objects, sorted by object: identical
    runs in consecutive rows (necessarily one object) become one rectangle."""
    order = np.lexsort((runs.row, runs.x1, runs.x0, obj))
    o, r, a, b = obj[order], runs.row[order], runs.x0[order], runs.x1[order]
    new = np.ones(len(o), bool)
    new[1:] = (o[1:] != o[:-1]) | (a[1:] != a[:-1]) | (b[1:] != b[:-1]) | (r[1:] != r[:-1] + 1)
    first = np.flatnonzero(new)
    last = np.append(first[1:], len(o)) - 1
    return np.stack([a[first], r[first] + row0, b[first], r[last] + row0 + 1], axis=1), o[first]


def _geometries(rects: np.ndarray, owner: np.ndarray, m: int) -> np.ndarray:
    """The union of each object's pixel rectangles, along pixel edges: (m,) geometries.

    Most blobs hold one run per row with consecutive rows sharing an edge; their outline is
    the right side going down, then the left side going up: a simple counter-clockwise ring,
    built for all of them at once. The rest go through a shapely union, one by one."""
    order = np.lexsort((rects[:, 0], rects[:, 1], owner))
    rects, owner = rects[order], owner[order]
    x0, y0, x1, y1 = rects.T
    chained = (y0[1:] == y1[:-1]) & (x0[1:] < x1[:-1]) & (x0[:-1] < x1[1:])
    slow = np.zeros(m, bool)
    slow[owner[1:][(owner[1:] == owner[:-1]) & ~chained]] = True
    geoms = np.empty(m, object)

    fast = ~slow[owner]
    fo, (fx0, fy0, fx1, fy1) = owner[fast], rects[fast].T
    if len(fo):
        counts = np.bincount(fo, minlength=m)
        start = np.cumsum(counts) - counts
        local = np.arange(len(fo)) - start[fo]
        n, base = counts[fo], 4 * start[fo]
        pts = np.empty((4 * len(fo), 2))
        right, left = base + 2 * local, base + 2 * n + 2 * (n - 1 - local)
        pts[right] = np.stack([fx1, fy0], 1)
        pts[right + 1] = np.stack([fx1, fy1], 1)
        pts[left] = np.stack([fx0, fy1], 1)
        pts[left + 1] = np.stack([fx0, fy0], 1)
        rings = np.repeat(np.arange(m), 4 * counts)
        pts, rings = _corners(pts, rings)
        which, dense = np.unique(rings, return_inverse=True)
        geoms[which] = shapely.polygons(shapely.linearrings(pts, indices=dense))
    slow_ids = np.flatnonzero(slow)
    lo, hi = np.searchsorted(owner, slow_ids, "left"), np.searchsorted(owner, slow_ids, "right")
    for k, a, b in zip(slow_ids.tolist(), lo.tolist(), hi.tolist()):
        geoms[k] = _tidy(shapely.union_all(shapely.box(x0[a:b], y0[a:b], x1[a:b], y1[a:b])))
    return geoms


def _corners(pts: np.ndarray, rings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Axis-parallel rings (points grouped by ring id, open) without repeated or
    straight-through vertices."""
    def neighbours(rings):
        first = np.ones(len(rings), bool)
        first[1:] = rings[1:] != rings[:-1]
        last = np.append(first[1:], True)
        starts, ends = np.flatnonzero(first), np.flatnonzero(last)
        size = ends - starts + 1
        idx = np.arange(len(rings))
        return (np.where(first, np.repeat(ends, size), idx - 1),
                np.where(last, np.repeat(starts, size), idx + 1))

    _, nxt = neighbours(rings)
    keep = np.any(pts[nxt] != pts, axis=1)
    pts, rings = pts[keep], rings[keep]
    prev, nxt = neighbours(rings)
    before, after = pts - pts[prev], pts[nxt] - pts
    keep = before[:, 0] * after[:, 1] != before[:, 1] * after[:, 0]
    return pts[keep], rings[keep]


def _tidy(geom):
    """Collinear vertices dropped, rings oriented as RFC 7946 asks, validity guaranteed."""
    geom = shapely.orient_polygons(shapely.simplify(geom, 0.0))
    if not geom.is_valid:   # not seen for pixel unions; kept so no invalid polygon leaves here
        geom = shapely.make_valid(geom, method="structure", keep_collapsed=False)
    return geom


# ---------------------------------------------------------------------- GeoJSON for QuPath
def write_geojson(path: Path, objects: list[SlideObject], class_names: list[str],
                  colours: list[tuple[int, int, int]], *, mpp: float | None = None) -> int:
    """A GeoJSON FeatureCollection of QuPath annotations (QuPath >= 0.4 layout: classification
    {name, color}, measurements as a map), written atomically, feature by feature. mpp:
    microns per level-0 pixel, adds area_um2. Returns the number of features."""
    path = Path(path)
    for obj in objects:
        if not 0 <= obj.class_id < min(len(class_names), len(colours)):
            raise ValueError(f"class {obj.class_id} has no name or colour "
                             f"({len(class_names)} names, {len(colours)} colours)")
    count = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write('{"type": "FeatureCollection", "features": [')
        for obj in objects:
            area = _number(obj.polygon.area)
            measurements: dict[str, float | int | None] = {"area_px": area}
            if mpp is not None:
                measurements["area_um2"] = obj.polygon.area * mpp * mpp
            p = obj.mean_probability
            measurements["mean_probability"] = None if math.isnan(p) else p   # JSON has no NaN
            feature = {
                "type": "Feature",
                "id": str(uuid.uuid4()),
                "geometry": _geometry(obj.polygon),
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": class_names[obj.class_id],
                                       "color": [int(c) for c in colours[obj.class_id]]},
                    "measurements": measurements,
                },
            }
            f.write((",\n" if count else "\n") + json.dumps(feature, allow_nan=False))
            count += 1
        f.write("\n]}\n")
    return count


def _number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def _ring(coords) -> list:
    a = np.asarray(coords, dtype=np.float64)
    # Pixel edges are integers at downsample 1 (and at any integral downsample): write them so.
    if np.array_equal(a, np.round(a)) and np.abs(a).max(initial=0) < 2**53:
        return a.astype(np.int64).tolist()
    return a.tolist()


def _geometry(geom: Polygon | MultiPolygon) -> dict:
    def rings(p: Polygon) -> list:
        return [_ring(p.exterior.coords)] + [_ring(r.coords) for r in p.interiors]

    if isinstance(geom, MultiPolygon):
        return {"type": "MultiPolygon", "coordinates": [rings(p) for p in geom.geoms]}
    return {"type": "Polygon", "coordinates": rings(geom)}
