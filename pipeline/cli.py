"""`flexunet <stage>`: parse arguments, load params once, call the stage function.

Errors a user can fix print as one line (`error: <file>: <problem>`) and exit 2; pass
--debug for the traceback and TensorFlow's own log output. `flexunet predict` (serving/cli.py)
runs in the light install (`pip install flexunet`); every other command needs the
`flexunet[pipeline]` extra and says so in one line without it. This module imports only the
standard library, PyYAML and common/ at module level.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import warnings
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from common.errors import UserError

log = logging.getLogger("flexunet")

# Top-level modules of the `flexunet[pipeline]` extra (pyproject.toml): every command but
# `predict` needs them; the light install (`pip install flexunet`) has none of them.
PIPELINE_EXTRA = frozenset({"tensorflow", "keras", "mlflow", "dvc", "dvclive", "tf2onnx", "onnx", "optuna",
                            "pydantic", "matplotlib", "nibabel", "scipy", "pandas", "tifffile", "zarr"})


def quiet_tensorflow(debug: bool, onednn: bool | None = None) -> None:
    """Import TensorFlow with the kernels params.yaml asks for (train.onednn; None: TF's
    own default), and keep its C++ start-up chatter from burying the project's messages.

    TF reads TF_ENABLE_ONEDNN_OPTS once, at import: params.yaml decides it, not an
    environment left over in the shell. TF_CPP_MIN_LOG_LEVEL silences TF's logger, but
    TF >= 2.16 prints absl lines before that logger exists, so stderr is muted at the
    file-descriptor level for the import.
    """
    if onednn is not None:
        wanted = "1" if onednn else "0"
        if "tensorflow" in sys.modules and os.environ.get("TF_ENABLE_ONEDNN_OPTS") != wanted:
            log.warning("TensorFlow is already imported; train.onednn (%s) cannot take effect", onednn)
        elif os.environ.get("TF_ENABLE_ONEDNN_OPTS", wanted) != wanted:
            log.warning("TF_ENABLE_ONEDNN_OPTS=%s ignored: params.yaml's train.onednn is %s",
                        os.environ["TF_ENABLE_ONEDNN_OPTS"], str(onednn).lower())
        os.environ["TF_ENABLE_ONEDNN_OPTS"] = wanted
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if debug else "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    if debug or "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow

        tensorflow.get_logger().setLevel(logging.ERROR)
        tensorflow.config.list_physical_devices()  # device probing logs (cuInit...) happen here
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise UserError(f"-S {text!r}: expected KEY=VALUE, e.g. -S train.epochs=3")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def _layout(args: argparse.Namespace, tuned: bool = True, tracking: bool = True, say_hidden: bool = False):
    """Params and paths of one call. tuned: apply tune/best_params.yaml when
    train.use_tuned_params (every stage after tune sees the same effective values);
    say_hidden: log, in one line, the params.yaml values the study's replaced (train does).
    tracking: the stage logs to MLflow, so a tracking server that does not answer stops
    it here, in one line, before anything else runs."""
    from pipeline.layout import Layout
    from pipeline.config.load import hidden_by_tuned, load_params, with_tuned_params

    params_path = Path(args.params)
    params = load_params(params_path, dict(_parse_override(s) for s in args.set or []))
    root = (Path(args.root) if args.root else params_path.resolve().parent).resolve()
    layout = Layout(root=root, params=params)
    if tuned and params.train.use_tuned_params:
        layout = Layout(root=root, params=with_tuned_params(params, layout.tuned_params_file))
        hidden = hidden_by_tuned(params, layout.params) if say_hidden else []
        if hidden:
            log.warning("train.use_tuned_params: the study's values (%s) replace params.yaml's: %s; set "
                        "train.use_tuned_params: false to train with params.yaml's", layout.tuned_params_file.name,
                        ", ".join(hidden))
    if tracking:
        from pipeline.tracking import find_project_root, reachable_tracking_uri

        reachable_tracking_uri(params.mlflow, find_project_root(root))
    return layout


def cmd_prepare(args: argparse.Namespace) -> None:
    from pipeline.stages.prepare import prepare

    prepare(_layout(args, tuned=False, tracking=False))


def cmd_train(args: argparse.Namespace) -> None:
    layout = _layout(args, say_hidden=True)
    layout.read_manifest()   # a missing dataset is said before TensorFlow takes seconds to load
    quiet_tensorflow(args.debug, layout.params.train.onednn)
    from pipeline.stages.train import train

    result = train(layout)
    log.info("MLflow run %s", result.run_id)


def cmd_tune(args: argparse.Namespace) -> None:
    layout = _layout(args, tuned=False)   # the search is around params.yaml's own values
    layout.read_manifest()
    quiet_tensorflow(args.debug, layout.params.train.onednn)
    from pipeline.stages.tune import tune

    tune(layout, worker=args.worker)


def cmd_evaluate(args: argparse.Namespace) -> None:
    layout = _layout(args)
    layout.read_run()   # the model's run: train ran
    quiet_tensorflow(args.debug, layout.params.train.onednn)
    from pipeline.stages.evaluate import evaluate

    evaluate(layout)


def cmd_export(args: argparse.Namespace) -> None:
    layout = _layout(args)
    quiet_tensorflow(args.debug, layout.params.train.onednn)
    from pipeline.stages.export import export

    export(layout)


def cmd_register(args: argparse.Namespace) -> None:
    from pipeline.stages.register import register

    register(_layout(args))


def cmd_evaluate_tiled(args: argparse.Namespace) -> None:
    from pipeline.stages.evaluate_tiled import evaluate_tiled

    evaluate_tiled(_layout(args))


def cmd_check(args: argparse.Namespace) -> None:
    layout = _layout(args, tuned=False, tracking=False)   # before the tune stage ran, too
    print(f"{args.params}: OK ({layout.params.dataset.name}, {layout.params.model.image_width}px, "
          f"{layout.params.model.num_layers} levels)")


def cmd_deps(args: argparse.Namespace) -> int:
    """Each stage's code, read from its imports; --check: compare with dvc.yaml's deps."""
    from pipeline import codegraph

    root = Path(args.root).resolve()
    if args.mermaid:
        print(codegraph.mermaid(root))
        return 0
    if args.write:
        changed = codegraph.write_deps(root)
        print(f"dvc.yaml: code deps rewritten for {', '.join(changed)}" if changed else "dvc.yaml: already right")
        return 0
    if args.check:
        problems = codegraph.dep_problems(root)
        for stage, lists in problems.items():
            for kind, files in lists.items():
                for f in files:
                    print(f"dvc.yaml stage {stage}: {kind} {f}", file=sys.stderr)
        crossing = {s: sorted(o) for s, o in codegraph.stage_imports(root).items() if o}
        for stage, others in crossing.items():
            print(f"pipeline/stages/{stage}.py imports the stage(s) {', '.join(others)}; move what they share "
                  f"out of pipeline/stages/", file=sys.stderr)
        if problems or crossing:
            print("fix it with `flexunet deps --write` (each stage then lists exactly the files it runs)", file=sys.stderr)
            return 1
        print("dvc.yaml: every stage lists exactly the code it runs; no stage imports another")
        return 0
    for stage in codegraph.dvc_stages(root):
        print(f"{stage}:")
        for f in codegraph.code_files(root, codegraph.stage_modules(root, stage)):
            print(f"  - {f}")
    return 0


def preset_names() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("pipeline.config.presets").iterdir()
                  if p.name.endswith(".yaml"))


def cmd_preset(args: argparse.Namespace) -> None:
    """Write params.yaml as the defaults with a shipped preset's overlay (the old file is kept)."""
    from common.atomic import write_text
    from pipeline.config.load import preset_dict

    names = preset_names()
    if args.name not in names:
        raise UserError(f"unknown preset {args.name!r}; available: {', '.join(names)}")
    source = resources.files("pipeline.config.presets") / f"{args.name}.yaml"
    with resources.as_file(source) as path:
        merged = preset_dict(path)
        header = [line for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("#")]
    target = Path(args.params)
    if target.exists():
        shutil.copyfile(target, target.with_name(target.name + ".bak"))
    header = [f"# flexunet preset {args.name}: the defaults with these keys changed (what each key means:",
              "# the shipped params.yaml and pipeline/config/schema.py).", *header[:-1]]
    write_text(target, "\n".join(header) + "\n" + yaml.safe_dump(merged, sort_keys=False, width=100))
    print(f"{target}: now preset {args.name!r} (previous file kept as {target.name}.bak)")


def _slide_size(text: str) -> int | tuple[int, int]:
    """--size 50000 (square) or HEIGHTxWIDTH."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a side in px (50000) or HEIGHTxWIDTH (30000x50000)")
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])


def cmd_synthesize(args: argparse.Namespace) -> None:
    """A synthetic PAS whole slide (pyramidal OME-TIFF), or one synthetic kidney scan (NIfTI)."""
    if args.volume:
        _synthesize_volume(args)
        return
    from pipeline.data.synthetic.whole_slide import write_whole_slide

    summary = write_whole_slide(Path(args.whole_slide), args.size, seed=args.seed, tissue_fraction=args.tissue_fraction,
                                mpp=args.mpp, mask_path=Path(args.mask) if args.mask else None)
    levels = ", ".join(f"{w}x{h}" for h, w in summary["levels"])
    print(f"{args.whole_slide}: levels {levels} (width x height); {summary['islands']} islands, tissue "
          f"{summary['tissue_fraction']:.4f}, {summary['glomerulus_pixels']} glomerulus px"
          + (f"; truth {args.mask}" if args.mask else "") + f" ({summary['seconds']:.1f} s)")


def _synthesize_volume(args: argparse.Namespace) -> None:
    from pipeline.data.synthetic.volume import synthetic_volume, write_volume

    volume = synthetic_volume(args.subject, args.group, seed=args.seed, spacing_mm=args.spacing,
                              slice_mm=args.slice_mm, slices=args.slices, orientation=args.orientation,
                              appearance=args.appearance)
    write_volume(Path(args.volume), volume, Path(args.mask) if args.mask else None)
    truth = volume.true_ml
    print(f"{args.volume}: {'x'.join(map(str, volume.image.shape))} voxels ({args.orientation.upper()}) at "
          f"{args.spacing:g} x {args.spacing:g} x {args.slice_mm:g} mm, sub-{args.subject:03d} ({args.group}); true TKV "
          f"{truth['tkv_ml']:.1f} ml (right {truth['right_kidney_ml']:.1f}, left {truth['left_kidney_ml']:.1f})"
          + (f"; mask {args.mask} (1 right, 2 left kidney)" if args.mask else ""))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flexunet", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks and TensorFlow logs")
    sub = parser.add_subparsers(dest="command", required=True)
    stages: dict[str, tuple[Callable, str]] = {
        "prepare": (cmd_prepare, "generate or import the dataset into data/<name>"),
        "tune": (cmd_tune, "Optuna study over tune.search_space (resumable; several workers may share it)"),
        "train": (cmd_train, "train FlexUNet, tracked in MLflow"),
        "evaluate": (cmd_evaluate, "test-split metrics, confusion matrix, mini_test panels"),
        "export": (cmd_export, "convert the trained model to ONNX and check parity"),
        "register": (cmd_register, "log the ONNX model to MLflow and register it (champion/challenger)"),
        "evaluate-tiled": (cmd_evaluate_tiled, "tiled ONNX prediction of mini_test vs the seed's resized inference"),
        "check": (cmd_check, "validate params.yaml and exit"),
    }
    for name, (func, help_text) in stages.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        p.add_argument("--root", default=None, help="project root (default: the params file's folder)")
        p.add_argument("-S", "--set", action="append", metavar="KEY=VALUE",
                       help="override a parameter for this call, e.g. -S train.epochs=2")
        p.set_defaults(func=func)
        if name == "tune":
            p.add_argument("--worker", type=int, default=0,
                           help="this worker's number (0, 1, ...): offsets the sampler seed so workers "
                                "sharing a study do not propose the same values")
    p = sub.add_parser("preset", help="replace params.yaml with a shipped preset")
    p.add_argument("name", help="one of: " + ", ".join(preset_names()))
    p.add_argument("--params", default="params.yaml")
    p.set_defaults(func=cmd_preset)
    p = sub.add_parser("deps", help="the code each DVC stage runs, from its imports (--check: against dvc.yaml)")
    p.add_argument("--root", default=".", help="project root holding dvc.yaml (default: .)")
    p.add_argument("--check", action="store_true", help="exit 1 when dvc.yaml lists too few or too many files")
    p.add_argument("--write", action="store_true", help="rewrite each stage's code deps in dvc.yaml to what it runs")
    p.add_argument("--mermaid", action="store_true", help="print the package import graph as a mermaid chart")
    p.set_defaults(func=cmd_deps)
    p = sub.add_parser("synthesize", help="write a synthetic PAS whole slide (pyramidal OME-TIFF, glomeruli) or "
                                          "a synthetic kidney scan (NIfTI)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--whole-slide", metavar="OUT.ome.tif", help="the slide to write")
    what.add_argument("--volume", metavar="OUT.nii.gz", help="one synthetic kidney-t2w subject as a NIfTI scan")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mask", metavar="MASK",
                   help="also write the truth: a tiled TIFF (slide: 1 = glomerulus) or NIfTI (volume: 1 = the "
                        "patient's right kidney, 2 = the left)")
    p.add_argument("--size", type=_slide_size, default=50000,
                   help="slide: side in px, or HEIGHTxWIDTH (default: 50000)")
    p.add_argument("--tissue-fraction", type=float, default=0.10,
                   help="slide: share of level-0 pixels that are tissue (default: 0.10, at most 0.3)")
    p.add_argument("--mpp", type=float, default=2.0,
                   help="slide: level-0 microns per pixel recorded (default: 2.0, the synthetic glomeruli training "
                        "images')")
    p.add_argument("--subject", type=int, default=1, help="volume: the subject number (its anatomy; default 1)")
    p.add_argument("--group", choices=("CKD", "healthy"), default="CKD", help="volume: the subject's group")
    p.add_argument("--spacing", type=float, default=1.5, metavar="MM",
                   help="volume: in-plane pixel spacing in mm (the field of view stays 384 mm; default 1.5)")
    p.add_argument("--slice-mm", type=float, default=5.0, metavar="MM", help="volume: slice thickness (default 5)")
    p.add_argument("--slices", type=int, default=18, help="volume: coronal slices (default 18: both kidneys whole)")
    p.add_argument("--orientation", default="RAS",
                   help="volume: the stored axis order and directions, nibabel axis codes (RAS, LPS, ASL...)")
    p.add_argument("--appearance", choices=("realistic", "randomised"), default="realistic",
                   help="volume: the T2w-like rendering or a domain-randomised one")
    p.set_defaults(func=cmd_synthesize)
    from serving.cli import add_predict_parser  # the light install's command: no TensorFlow, no pydantic

    add_predict_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read by mlflow at import
    for noisy in ("alembic", "mlflow", "absl", "h5py", "matplotlib", "PIL", "tf2onnx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Keras warns that fit(shuffle=True) is ignored for tf.data: we shuffle in the pipeline.
    warnings.filterwarnings("ignore", message=".*`shuffle=True` was passed.*")
    try:
        status = args.func(args)  # None, or a stage's own status (predict: 1 = some images failed)
    except UserError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        if args.debug or missing not in PIPELINE_EXTRA:
            raise
        print(f"error: `flexunet {args.command}` needs the pipeline extra ({missing} is not installed): "
              f"pip install 'flexunet[pipeline]'", file=sys.stderr)
        return 2
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
