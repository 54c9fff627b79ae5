"""params.yaml schema: the shipped files validate; typos and bad values fail clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.cli import preset_names
from common.errors import ParamsError
from pipeline.config.load import as_yaml_dict, load_params, params_from_dict, preset_dict
from pipeline.config.schema import Params

REPO = Path(__file__).resolve().parents[3]
PRESETS = REPO / "pipeline" / "config" / "presets"


def test_shipped_params_and_presets_validate():
    p = load_params(REPO / "params.yaml")
    assert p.model.base_kernels == (3, 3) and p.train.max_minutes is None and p.tune.timeout_minutes is None
    assert p.mask.rgb_map[(255, 0, 0)] == 1 and p.mask.colours[2] == (0, 255, 0)
    names = preset_names()
    assert {"seed-kidney-t2w-gpu", "seed-glomeruli-gpu", "glomeruli-cpu", "kidney-t2w-cpu"} <= set(names)
    seed = params_from_dict(preset_dict(PRESETS / "seed-kidney-t2w-gpu.yaml"))
    assert (seed.model.image_width, seed.model.num_layers, seed.model.base_filters) == (512, 8, 16)
    assert seed.train.learning_rate == pytest.approx(7e-5)
    # The seed's large first kernel stays a preset; the default is the same builder, CPU-sized.
    assert seed.model.base_kernels == (11, 11) and p.model.num_layers < seed.model.num_layers


def test_the_schema_defaults_are_the_shipped_params_yaml():
    assert Params() == load_params(REPO / "params.yaml")
    assert params_from_dict(preset_dict(PRESETS / "kidney-t2w-cpu.yaml")) == Params()


@pytest.mark.parametrize("name", ["glomeruli-cpu", "seed-glomeruli-gpu", "seed-kidney-t2w-gpu", "kidney-t2w-cpu"])
def test_presets_are_small_overlays_of_changed_keys_only(name):
    """A preset names only keys it changes, so a changed default reaches it (no copy drifts)."""
    overlay = yaml.safe_load((PRESETS / f"{name}.yaml").read_text()) or {}
    defaults = as_yaml_dict(Params())
    for section, values in overlay.items():
        for key, value in values.items():
            default = defaults[section][key]
            if isinstance(value, dict) and key not in ("rgb_map", "search_space"):
                assert all(v != default.get(k) for k, v in value.items()), (section, key)
            else:
                assert value != default, f"{name}: {section}.{key} repeats the default"
    assert len((PRESETS / f"{name}.yaml").read_text().splitlines()) < 60


def test_typo_names_key_and_valid_keys(raw_params):
    raw_params["model"]["base_filter"] = raw_params["model"].pop("base_filters")
    with pytest.raises(ParamsError) as err:
        params_from_dict(raw_params, source="params.yaml")
    msg = str(err.value)
    assert "params.yaml" in msg and "'model.base_filter'" in msg
    assert "did you mean 'base_filters'" in msg and "num_layers" in msg


def test_seed_key_location_gets_a_pointer(raw_params):
    raw_params["model"]["learning_rate"] = 7e-5
    with pytest.raises(ParamsError, match="'model.learning_rate' is now 'train.learning_rate'"):
        params_from_dict(raw_params)


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("model", "base_kernels", [10, 10], "kernel sizes must be odd"),
        ("model", "image_width", 34, "image_width 34 is not divisible by 2^(num_layers-1) = 4"),
        ("model", "base_filters", "sixteen", "model.base_filters"),
        ("model", "dropout_rate", -0.1, "model.dropout_rate"),
        ("train", "loss", "focal", "train.loss"),
        ("mask", "rgb_map", {"(0,0,0)": 0, "(255,0,0)": 1, "(0,255,0)": 1}, "class id(s) [1] used by more"),
        ("mask", "rgb_map", {"(0,0,0)": 0, "(255,0,0)": 1, "(0,256,0)": 2}, "outside 0..255"),
        ("mask", "rgb_map", {"black": 0, "(255,0,0)": 1, "(0,255,0)": 2}, "not of the form"),
        ("dataset", "split", {"train": 0.8, "valid": 0.15, "test": 0.15}, "must be 1.0"),
        ("predict", "overlap", 1.0, "predict.overlap"),
        ("predict", "blend", "linear", "predict.blend"),
        ("export", "opset", 19, "export.opset"),
        ("train", "precision", "float16", "train.precision"),
    ],
)
def test_bad_values_say_which_and_why(raw_params, section, key, value, expected):
    raw_params[section][key] = value
    with pytest.raises(ParamsError) as err:
        params_from_dict(raw_params)
    assert expected in str(err.value)


def test_one_learning_rate_controller(raw_params):
    raw_params["train"].update(lr_schedule="cosine", learning_rate_reducer=True)
    with pytest.raises(ParamsError, match="both set the learning rate; set learning_rate_reducer: false"):
        params_from_dict(raw_params)
    raw_params["train"]["learning_rate_reducer"] = False
    assert params_from_dict(raw_params).train.lr_schedule == "cosine"


def test_register_section_is_named_registry(raw_params):
    raw_params["register"] = {"model_name": "x"}
    with pytest.raises(ParamsError, match="unknown key 'register' .*did you mean 'registry'"):
        params_from_dict(raw_params)


def test_sections_must_agree(raw_params):
    raw_params["model"]["num_classes"] = 2
    with pytest.raises(ParamsError, match="num_classes is 2 but mask.rgb_map has 3 colours"):
        params_from_dict(raw_params)
    raw_params["model"]["num_classes"] = 3
    raw_params["dataset"]["image_size"] = 64
    with pytest.raises(ParamsError, match="dataset.image_size 64 must equal"):
        params_from_dict(raw_params)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)


def test_overrides_and_flat_keys(tmp_path, raw_params):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw_params))
    p = load_params(path, {"train.learning_rate": 3e-4})
    assert p.train.learning_rate == pytest.approx(3e-4)
    flat = p.flat()
    assert flat["train.learning_rate"] == pytest.approx(3e-4)
    assert flat["mask.rgb_map"] == "{(0,0,0): 0, (255,0,0): 1, (0,255,0): 2}"
    assert flat["train.augment.flip"] is True
