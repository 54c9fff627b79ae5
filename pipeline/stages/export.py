"""Export stage: models/model.keras -> models/model.onnx, with a TF/ONNX parity check.

The ONNX model follows the serving contract (serving/card.py): input `image`, NHWC
float32 of raw 0..255 pixels with dynamic batch, height and width; output NHWK softmax
probabilities; the ModelCard JSON in metadata_props. The stage streams the test split
once through TF, onnxruntime fp32 and (optionally) int8, and fails -- leaving no
outputs -- when max |p_tf - p_onnx| > export.parity_max_abs or the argmax agreement
< export.parity_min_agreement. The numbers go to metrics/export.json and into the
training MLflow run (also when the check fails, so the run shows why).
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import onnx

from pipeline.data.tfdata import load_split, make_dataset
from common.errors import FlexUNetError
from pipeline.model.flexunet import load_model
from pipeline.scoring.confusion import Accumulator
from pipeline.layout import Layout
from pipeline.config.schema import Params
from pipeline.tracking import find_project_root, start_run
from common.atomic import atomic_path, remove_on_failure, write_json
from serving.card import METADATA_KEY, ModelCard, sha256_file

log = logging.getLogger(__name__)

INPUT_NAME = "image"
CALIBRATION_IMAGES = 16  # train images for int8 static calibration: enough for stable min/max


class ExportError(FlexUNetError):
    """The Keras model cannot be exported, or the ONNX model misses the parity targets."""


def int8_file(layout: Layout) -> Path:
    return layout.models / "model.int8.onnx"


def tta_flips(params: Params) -> list[str]:
    """The flips training augmentation made the model invariant to: left-right flips, plus
    up-down and both when 90-degree rotations were on too (histology has no up)."""
    a = params.train.augment
    if a.rot90 and a.flip:
        return ["lr", "ud", "lrud"]
    if a.rot90:
        return ["lrud"]  # rotation by 180 degrees
    return ["lr"] if a.flip else []


def space_to_depth_levels(params: Params) -> int:
    """How many top levels export computes on 2x2 phases. auto: the space_to_depth cost
    model for AVX-512's 16-channel blocks. Fixed to AVX-512 rather than probed, so that the
    same params give the same ONNX bytes on every machine."""
    from pipeline.model.architecture import dilation_schedule, kernel_schedule
    from pipeline.model.space_to_depth import levels_that_pay_off

    choice, m = params.export.space_to_depth, params.model
    if choice == "auto":
        choice = levels_that_pay_off(kernel_schedule(m.base_kernels, m.num_layers),
                                     dilation_schedule(m.dilation, m.num_layers),
                                     [m.base_filters * 2**i for i in range(m.num_layers)])
    elif choice > m.num_layers - 1:  # e.g. a tuned, shallower model
        log.warning("export.space_to_depth %d > num_layers - 1: %d level(s) on phases", choice, m.num_layers - 1)
    return min(choice, m.num_layers - 1)  # the bottom level's sides need not be even


def card_for(params: Params, run_id: str | None, manifest: dict[str, Any]) -> ModelCard:
    """The model card from the params and the dataset's manifest (its scale: how the training
    images were made and at what spacing, as prepare recorded it)."""
    m = params.model
    scale = dict(manifest.get("scale") or {})
    for key in ("spacing_range", "intensity_percentiles"):
        if scale.get(key) is not None:
            scale[key] = tuple(scale[key])
    return ModelCard(
        channels=m.image_channels, num_classes=m.num_classes, size_multiple=m.size_multiple,
        tile_size=m.image_width, class_names=list(params.mask.class_names),
        colours=[tuple(c) for c in params.mask.colours], num_layers=m.num_layers, run_id=run_id,
        dataset=params.dataset.name, dataset_fingerprint=manifest.get("fingerprint"), tta_flips=tta_flips(params),
        single_foreground_class=params.mask.single_foreground_class,
        tissue_threshold=params.predict.tissue_threshold or None, **scale,
        min_component_ml=params.evaluate.min_component_ml if scale.get("plane") else 0.0,
        min_object_px=params.predict.min_object_px or 0,
        extra={"opset": str(params.export.opset), "input": "NHWC float32 0..255", "output": "NHWK softmax"},
    )


# --------------------------------------------------------------------------- conversion
def _open_size(model: keras.Model) -> keras.Model:
    """Same architecture and weights with open batch/H/W (the trained model is built for one
    size): the functional config with the input's H and W set to None, rebuilt."""
    if tuple(model.input_shape[1:3]) == (None, None):
        return model
    config = model.get_config()
    for layer in config.get("layers", []):
        if layer.get("class_name") == "InputLayer":
            layer["config"]["batch_shape"] = (None, None, None, layer["config"]["batch_shape"][-1])
    try:
        dynamic = keras.Model.from_config(config)
        dynamic.set_weights(model.get_weights())
    except (ValueError, TypeError, KeyError) as exc:
        raise ExportError(f"cannot rebuild {model.name} with open height/width ({exc}); "
                          "export needs the functional FlexUNet") from None
    return dynamic


def _name_dims(proto: onnx.ModelProto) -> None:
    """tf2onnx leaves anonymous `unk__N` dims; give the graph's inputs/outputs readable names."""
    for value in [*proto.graph.input, *proto.graph.output]:
        dims = value.type.tensor_type.shape.dim
        for dim, name in zip(dims, ("batch", "height", "width")):
            if not dim.HasField("dim_value"):
                dim.dim_param = name


def _canonical_names(proto: onnx.ModelProto) -> None:
    """Rename nodes and tensors by position, drop value_info: tf2onnx's names carry
    process-wide counters (`Conv__353`, `FlexUNet_1/...`), so the same weights exported twice
    would give different bytes. Deterministic bytes make the sha256 identify the model (the
    registry's idempotency key) and keep DVC from seeing a change where there is none."""
    g = proto.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute):
        return  # control flow subgraphs: not produced by FlexUNet; leave the names alone
    keep = {v.name for v in [*g.input, *g.output]}
    inits = {t.name for t in g.initializer}
    rename: dict[str, str] = {}
    for node in g.node:  # constants numbered by first use, not by their counter-laden names
        for name in node.input:
            if name in inits and name not in rename:
                rename[name] = f"const_{len(rename)}"
    for name in sorted(inits - rename.keys()):
        rename[name] = f"const_{len(rename)}"
    for i, node in enumerate(g.node):
        node.name = f"{node.op_type}_{i}"
        rename.update({out: f"{node.name}:{k}" for k, out in enumerate(node.output) if out and out not in keep})
    for node in g.node:
        node.input[:] = [rename.get(x, x) for x in node.input]
        node.output[:] = [rename.get(x, x) for x in node.output]
    tensors = sorted(g.initializer, key=lambda t: int(rename[t.name].split("_")[1]))
    tensors = [onnx.TensorProto.FromString(t.SerializeToString()) for t in tensors]
    for t in tensors:
        t.name = rename[t.name]
    del g.initializer[:], g.value_info[:]
    g.initializer.extend(tensors)


def to_onnx(model: keras.Model, path: Path, card: ModelCard, *, opset: int = 17,
            phase_levels: int = 0) -> Path:
    """Convert with tf2onnx (dynamic N/H/W, input `image`), embed the card, check, write atomically.
    phase_levels: convert the same function with that many top levels on 2x2 phases."""
    import tensorflow as tf
    import tf2onnx

    from pipeline.model.space_to_depth import rewrite

    # the card says what this file computes, whoever chose the levels
    card = dataclasses.replace(card, extra={**card.extra, "space_to_depth_levels": str(phase_levels)})
    model = _open_size(model)
    if phase_levels:
        try:
            model = rewrite(model, phase_levels)
        except Exception as exc:  # Unsupported, or Keras refusing the rebuilt graph
            raise ExportError(f"{path}: cannot compute {phase_levels} level(s) on 2x2 phases ({exc}); "
                              "set export.space_to_depth: 0") from exc
    spec = (tf.TensorSpec((None, None, None, card.channels), tf.float32, name=INPUT_NAME),)
    try:
        proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset)
    except Exception as exc:  # tf2onnx raises bare ValueError/KeyError/... on unsupported graphs
        raise ExportError(f"{path}: tf2onnx conversion at opset {opset} failed: {exc}") from exc
    _name_dims(proto)
    _canonical_names(proto)
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, card.to_json()
    proto.producer_name = "flexunet"
    onnx.checker.check_model(proto)
    with atomic_path(path, suffix=".onnx.tmp") as tmp:
        onnx.save_model(proto, str(tmp))
    log.info("ONNX opset %d -> %s (%.1f MB)", opset, path, path.stat().st_size / 1e6)
    return path


def session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------- int8
def quantize_int8(fp32: Path, target: Path, layout: Layout) -> Path:
    """Static QDQ int8 (per-channel weights), calibrated on a few train images.

    Static beats dynamic for a conv net: dynamic quantisation turns Conv into ConvInteger,
    which onnxruntime runs slower than fp32 on CPU. Unsigned activations with signed
    weights (U8S8): on this AVX512-VNNI CPU the default model ran 3.0x faster than fp32
    with U8S8 but only 1.5x with S8S8 (the quantiser's default), at the same test Dice
    (0.899 vs 0.907 fp32; benchmarks/int8_variants.py). Percentile or entropy calibration,
    64 calibration images, or keeping the head in fp32 changed it by at most 0.05 points.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    p = layout.params
    pairs = load_split(layout.data_dir, "train", p.mask, (p.model.image_width, p.model.image_height))
    ds = make_dataset(pairs[:CALIBRATION_IMAGES], p.mask, channels=p.model.image_channels,
                      batch_size=p.evaluate.batch_size)
    batches = [images.numpy() for images, _ in ds]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter({INPUT_NAME: b} for b in batches)

        def get_next(self):
            return next(self.it, None)

    with tempfile.TemporaryDirectory(dir=target.parent) as work, atomic_path(target, suffix=".onnx.tmp") as tmp:
        pre = Path(work) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(tmp), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        # The quantiser does not promise to keep metadata_props: re-embed the card.
        model = onnx.load(str(tmp))
        del model.metadata_props[:]
        model.metadata_props.extend(onnx.load(str(fp32), load_external_data=False).metadata_props)
        onnx.save_model(model, str(tmp))
    return target


# --------------------------------------------------------------------------- parity
def compare(model: keras.Model, sessions: dict[str, Any], layout: Layout) -> dict[str, float]:
    """Stream the test split once: each session vs TF (max abs diff, argmax agreement),
    its test Dice against the masks, and its images/s (onnxruntime time only)."""
    from tqdm import tqdm

    p = layout.params
    pairs = load_split(layout.data_dir, "test", p.mask, (p.model.image_width, p.model.image_height))
    ds = make_dataset(pairs, p.mask, channels=p.model.image_channels, batch_size=p.evaluate.batch_size)
    acc = {name: Accumulator(p.model.num_classes, p.mask.single_foreground_class) for name in sessions}
    stats = {name: {"max_abs": 0.0, "agree": 0, "seconds": 0.0} for name in sessions}
    pixels = images_seen = 0
    steps = -(-len(pairs) // p.evaluate.batch_size)
    for images, onehot in tqdm(ds, total=steps, desc="parity on test", unit="batch"):
        x, truth = images.numpy(), onehot.numpy()
        p_tf = np.asarray(model(x, training=False))
        for name, sess in sessions.items():
            feed = {sess.get_inputs()[0].name: x}
            if images_seen == 0:
                sess.run(None, feed)  # warm-up: first-run allocation is not throughput
            start = time.perf_counter()
            probs = sess.run(None, feed)[0]
            s = stats[name]
            s["seconds"] += time.perf_counter() - start
            s["max_abs"] = max(s["max_abs"], float(np.abs(p_tf - probs).max()))
            s["agree"] += int((p_tf.argmax(-1) == probs.argmax(-1)).sum())
            acc[name].update(truth, probs, 0.0)
        pixels += int(np.prod(p_tf.shape[:-1]))
        images_seen += len(x)
    out: dict[str, float] = {"parity_images": images_seen}
    for name, s in stats.items():
        out[f"{name}_max_abs_vs_tf"] = s["max_abs"]
        out[f"{name}_argmax_agreement_vs_tf"] = s["agree"] / max(pixels, 1)
        out[f"{name}_mean_foreground_dice"] = acc[name].metrics(p.mask.class_names)["mean_foreground_dice"]
        out[f"{name}_images_per_second"] = images_seen / max(s["seconds"], 1e-9)
    return out


def _failure(report: dict[str, Any], params: Params) -> str | None:
    e = params.export
    problems = []
    if not report["parity_max_abs"] <= e.parity_max_abs:  # `not <=` also catches NaN
        problems.append(f"max |p_tf - p_onnx| {report['parity_max_abs']:.3g} > "
                        f"export.parity_max_abs {e.parity_max_abs:g}")
    if not report["parity_argmax_agreement"] >= e.parity_min_agreement:
        problems.append(f"argmax agreement {report['parity_argmax_agreement']:.6f} < "
                        f"export.parity_min_agreement {e.parity_min_agreement:g}")
    if not problems:
        return None
    return (f"models/model.onnx: TF/ONNX parity failed on {report['parity_images']} test images: "
            + "; ".join(problems) + " (try TF_ENABLE_ONEDNN_OPTS=0 or another export.opset)")


def export(layout: Layout) -> dict[str, Any]:
    """The DVC stage: write models/model.onnx (+ model.int8.onnx) and metrics/export.json."""
    p = layout.params
    model = load_model(layout.model_file)
    run_id = layout.read_run()["run_id"]
    card = card_for(p, run_id, layout.read_manifest())
    levels = space_to_depth_levels(p)
    metrics_file, int8 = layout.metrics / "export.json", int8_file(layout)
    with remove_on_failure([layout.onnx_file, int8, metrics_file]):
        int8.unlink(missing_ok=True)  # a stale int8 model must not outlive a new fp32 one
        to_onnx(model, layout.onnx_file, card, opset=p.export.opset, phase_levels=levels)
        sessions = {"fp32": session(layout.onnx_file)}
        if p.export.quantize_int8:
            sessions["int8"] = session(quantize_int8(layout.onnx_file, int8, layout))
        report: dict[str, Any] = {
            "opset": p.export.opset, "space_to_depth_levels": levels,
            "onnx_bytes": layout.onnx_file.stat().st_size,
            "onnx_sha256": sha256_file(layout.onnx_file),
            "target_max_abs": p.export.parity_max_abs, "target_min_agreement": p.export.parity_min_agreement,
            **compare(model, sessions, layout),
        }
        report["parity_max_abs"] = report["fp32_max_abs_vs_tf"]
        report["parity_argmax_agreement"] = report["fp32_argmax_agreement_vs_tf"]
        if p.export.quantize_int8:
            report.update(int8_bytes=int8.stat().st_size, int8_sha256=sha256_file(int8))
        failure = _failure(report, p)
        report["parity_passed"] = failure is None
        _log_to_run(layout, run_id, report)
        if failure:
            raise ExportError(failure)
        write_json(metrics_file, report)
    log.info("export: max |p_tf - p_onnx| %.2e, argmax agreement %.6f, fp32 Dice %.4f",
             report["parity_max_abs"], report["parity_argmax_agreement"], report["fp32_mean_foreground_dice"])
    return report


def _log_to_run(layout: Layout, run_id: str, report: dict[str, Any]) -> None:
    numbers = {f"export_{k}": float(v) for k, v in report.items()
               if isinstance(v, (int, float)) and not k.startswith("target_")}
    with start_run(layout.params.mlflow, find_project_root(layout.root), run_id=run_id) as run:
        run.log_metrics(numbers)
        run.set_tags({"export.onnx_sha256": report["onnx_sha256"]})
