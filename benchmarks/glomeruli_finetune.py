"""What a handful of real PAS tiles buys: synthetic only, real only, and synthetic then real.

The 6 real tiles (data/real-sample/glomeruli-pas) are split into two folds of 3 by file
order: A = 10177, 10183, 10191 and B = 10210, 10220, 10224. For each fold in turn, its 3
tiles train and the other 3 score:

- **synthetic only**: the glomeruli-cpu preset's model at 10 epochs (prepare, train, export
  in a scratch project; `train.use_tuned_params: false`), trained once and used for both folds;
- **real only, from scratch**: the same architecture trained on the 3 training tiles;
- **synthetic, then real**: the synthetic model fine-tuned on them (`train.init_from`).

The training tiles are resampled from their assumed 0.5 um/px to the model's 2 um/px
(1024 -> 256 px) and cut into 9 overlapping 128 px crops each (stride 64), imported as
`dataset.source: glomeruli-png` (split by crop: crops of one tile may sit in train and
valid, which only flatters the validation loss; the score comes from the other fold),
`train.epochs` 30 (about 150 steps). Every arm is scored by evaluate-tiled on the 3
held-out whole tiles, as `flexunet predict --spacing 0.5` predicts them.

    python benchmarks/glomeruli_finetune.py

Results: benchmarks/results/glomeruli_finetune.{json,md}, summarised in docs/results.md.
Three tiles score each fold: read the numbers as a direction, with their intervals.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_results import machine_summary, run_stages, write_results  # noqa: E402
from glomeruli_variants import SAMPLE, scratch_glomeruli  # noqa: E402

FOLDS = {"A": ["10177", "10183", "10191"], "B": ["10210", "10220", "10224"]}
SAMPLE_MPP, MODEL_MPP, TILE, STRIDE = 0.5, 2.0, 128, 64
BASE = ["train.use_tuned_params=false", "mlflow.log_model=false", "train.epoch_change_tiled_infer=false"]
REAL = ["dataset.source=glomeruli-png", "train.epochs=30"]


def real_crops(stems: list[str], raw: Path) -> int:
    """The training tiles at the model's resolution, as overlapping model-size crops."""
    (raw / "images").mkdir(parents=True)
    (raw / "masks").mkdir()
    count = 0
    for stem in stems:
        image, mask = (Image.open(SAMPLE / d / f"{stem}.png").convert("RGB") for d in ("images", "masks"))
        side = round(image.width * SAMPLE_MPP / MODEL_MPP)
        image = np.asarray(image.resize((side, side), Image.Resampling.BOX))
        mask = np.asarray(mask.resize((side, side), Image.Resampling.NEAREST))
        for y in range(0, side - TILE + 1, STRIDE):
            for x in range(0, side - TILE + 1, STRIDE):
                name = f"{stem}_y{y}_x{x}.png"
                Image.fromarray(image[y:y + TILE, x:x + TILE]).save(raw / "images" / name)
                Image.fromarray(mask[y:y + TILE, x:x + TILE]).save(raw / "masks" / name)
                count += 1
    return count


def held_out(stems: list[str], folder: Path) -> Path:
    """A real-sample folder holding only the scoring tiles."""
    for d in ("images", "masks"):
        (folder / d).mkdir(parents=True)
        for stem in stems:
            shutil.copy(SAMPLE / d / f"{stem}.png", folder / d / f"{stem}.png")
    return folder


def score(project: Path, overrides: list[str], stages: tuple[str, ...], label: str) -> dict:
    seconds = run_stages(project, stages, BASE + overrides, label=label)
    report = json.loads((project / "metrics" / "real_sample_predict.json").read_text())
    keys = ("real_glomerulus_dice", "real_object_f1")
    return {"seconds": seconds, **{k: report[k] for k in keys},
            **{f"{k}_ci": [report[f"{k}_ci_low"], report[f"{k}_ci_high"]] for k in keys},
            "per_tile": {t["stem"]: t["glomerulus_dice"] for t in report["per_tile"]}}


def main() -> None:
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="glom-finetune-") as tmp:
        tmp = Path(tmp)
        synthetic = tmp / "synthetic"
        scratch_glomeruli(synthetic)
        run_stages(synthetic, ("prepare", "train", "export"), BASE + ["train.epochs=10"], label="synthetic")
        weights = synthetic / "models" / "model.keras"
        for fold, train_stems in FOLDS.items():
            scored = [s for stems in FOLDS.values() for s in stems if s not in train_stems]
            sample = held_out(scored, tmp / f"held-out-{fold}")
            on_sample = [f"evaluate.real_sample={json.dumps(str(sample))}"]
            rows[f"synthetic only | {fold}"] = score(synthetic, on_sample, ("evaluate-tiled",), f"synthetic {fold}")
            for arm, init in (("real only, from scratch", None), ("synthetic, then real", weights)):
                project = tmp / f"{fold}-{len(rows)}"
                scratch_glomeruli(project)
                crops = real_crops(train_stems, project / "raw")
                extra = [f"dataset.raw={json.dumps(str(project / 'raw'))}", *REAL, *on_sample]
                if init is not None:
                    extra.append(f"train.init_from={json.dumps(str(init))}")
                rows[f"{arm} | {fold}"] = {**score(project, extra, ("prepare", "train", "export", "evaluate-tiled"),
                                                   f"{arm} {fold}"), "training_crops": crops}
            for name in [n for n in rows if n.endswith(f"| {fold}")]:
                rows[name].update(trained_on=train_stems, scored_on=scored)
    write_results(REPO / "benchmarks" / "results" / "glomeruli_finetune", {"machine": machine_summary(), "rows": rows},
                  markdown)


def markdown(result: dict) -> str:
    mc = result["machine"]
    lines = [f"Machine: {mc['cpu']}, {mc['cores']} cores, vector ISA {mc['vector_isa']}. Real tiles at 0.5 um/px, "
             "the model at 2 um/px; 95 % bootstrap intervals over the 3 scoring tiles.", "",
             "| model | fold: trained on -> scored on | real glomerulus Dice | object F1 | per tile Dice |",
             "|---|---|---:|---:|---|"]
    for name, r in result["rows"].items():
        arm, fold = name.split(" | ")
        def cell(key: str) -> str:
            low, high = r[f"{key}_ci"]
            return f"{r[key]:.2f}" + (f" [{low:.2f}, {high:.2f}]" if low is not None else "")
        per = " ".join(f"{v:.2f}" for v in r["per_tile"].values() if v is not None)
        trained = "synthetic" if arm == "synthetic only" else ", ".join(r["trained_on"])
        lines.append(f"| {arm} | {fold}: {trained} -> {', '.join(r['scored_on'])} | **{cell('real_glomerulus_dice')}** "
                     f"| {cell('real_object_f1')} | {per} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
