"""params.yaml: loaded once, validated against pipeline.config.schema, handed down as one
typed object.

No other module reads the YAML. Every error names the key, the value and why it is
wrong, because a typo in a 60-line params file should cost seconds, not a failed run.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from common.errors import ParamsError
from pipeline.config.schema import Params
from pipeline.config.search_space import TUNABLE, apply_values, current_values


# Keys the seed kept elsewhere: a pointer beats "unknown key".
_MOVED = {
    ("model", "learning_rate"): "train.learning_rate",
    ("model", "loss"): "train.loss",
}


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None


def load_params(path: Path | str = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Read and validate params.yaml; raise ParamsError with one readable line per problem."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: not found; run from the project root or pass --params PATH")
    raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: top level must be a mapping of sections")
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    return params_from_dict(raw, source=str(path))


def with_tuned_params(params: Params, path: Path) -> Params:
    """`params` with the tune stage's best values (path: tune/best_params.yaml) applied."""
    if not path.is_file():
        raise ParamsError(f"{path}: not found, but train.use_tuned_params is true; run the tune stage "
                          f"first (dvc repro tune) or set train.use_tuned_params: false")
    best = _read_yaml(path) or {}
    values = best.get("params") if isinstance(best, dict) else None
    if not isinstance(values, dict) or not values:
        raise ParamsError(f"{path}: no 'params' mapping; rerun the tune stage (dvc repro -f tune)")
    unknown = sorted(set(values) - set(TUNABLE))
    if unknown:
        raise ParamsError(f"{path}: {unknown} cannot be tuned; tunable: {', '.join(TUNABLE)}")
    return params_from_dict(apply_values(params.model_dump(mode="python"), values), source=f"{path} over params")


def hidden_by_tuned(params: Params, tuned: Params) -> list[str]:
    """`section.key ours -> theirs` for each params.yaml value that with_tuned_params replaced
    with a different one: an edit of params.yaml that the study's values hide."""
    ours = current_values(params.model, params.train, list(TUNABLE))
    theirs = current_values(tuned.model, tuned.train, list(TUNABLE))
    return [f"{TUNABLE[k]}.{k} {ours[k]!r} -> {theirs[k]!r}" for k in TUNABLE if ours[k] != theirs[k]]


def params_from_dict(raw: dict[str, Any], source: str = "params") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(_explain(exc, raw, source)) from None


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value


def _explain(exc: ValidationError, raw: dict[str, Any], source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        key = ".".join(loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(_unknown_key(loc))
        elif err["type"] == "missing":
            lines.append(f"missing key '{key}'")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            shown = f" (got {err['input']!r})" if not isinstance(err["input"], dict) else ""
            lines.append(f"'{key}': {msg}{shown}" if loc else msg)
    return f"{source}: " + "; ".join(lines)


def _unknown_key(loc: tuple[str, ...]) -> str:
    if loc[-2:] in _MOVED and len(loc) == 2:
        return f"'{'.'.join(loc)}' is now '{_MOVED[loc[-2:]]}' (the seed kept it under [model])"
    section: type[BaseModel] = Params
    for part in loc[:-1]:
        field = section.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break
        section = annotation
    valid = sorted(section.model_fields)
    close = difflib.get_close_matches(loc[-1], valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    where = f"in '{'.'.join(loc[:-1])}'" if len(loc) > 1 else "at the top level"
    return f"unknown key '{'.'.join(loc)}'{hint}; valid keys {where}: {', '.join(valid)}"


def as_yaml_dict(params: Params) -> dict[str, Any]:
    """`params` in params.yaml's form: colour keys as '(R,G,B)', tuples as lists, nulls kept."""
    def plain(value: Any) -> Any:
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {(f"({k[0]},{k[1]},{k[2]})" if isinstance(k, tuple) else k): plain(v) for k, v in value.items()}
        return value

    return plain(params.model_dump(mode="python", exclude_none=False))


def merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """`overlay` over `base`, section by section; a mapping that names whole values (a
    colour map, a search space) replaces the base's instead of merging into it."""
    out = dict(base)
    for key, value in overlay.items():
        whole = key in ("rgb_map", "search_space", "groups")
        if isinstance(value, dict) and isinstance(out.get(key), dict) and not whole:
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def preset_dict(overlay_path: Path) -> dict[str, Any]:
    """A preset (an overlay of the keys that differ from the defaults) as a whole params dict."""
    overlay = _read_yaml(overlay_path) or {}
    if not isinstance(overlay, dict):
        raise ParamsError(f"{overlay_path}: top level must be a mapping of sections")
    merged = merge(as_yaml_dict(Params()), overlay)
    params_from_dict(merged, source=f"{overlay_path} over the defaults")   # validate
    return merged
