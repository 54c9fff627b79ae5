"""The search space of the `tune` section (pipeline.config.schema.TuneParams): its entries
and what the tune stage does with them.

A search-space entry names a tunable parameter and how to sample it:

    base_filters:  {type: categorical, choices: [4, 8, 16]}
    base_kernels:  {type: int, low: 3, high: 11, step: 2}     # odd sizes only
    learning_rate: {type: float, low: 1.0e-4, high: 3.0e-3, log: true}

Names are the keys of `model` or `train` listed in TUNABLE (the section is implied).
`base_kernels` samples one odd size k and means (k, k). Everything that cannot be
sampled -- an even kernel, empty choices, low > high, log with low <= 0 -- fails when
params.yaml is loaded, naming the entry.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Tunable name -> the params.yaml section it lives in.
TUNABLE: dict[str, str] = {
    "base_filters": "model", "base_kernels": "model", "num_layers": "model", "dropout_rate": "model",
    "learning_rate": "train", "loss": "train", "batch_size": "train",
}


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Categorical(_Entry):
    type: Literal["categorical"]
    choices: list[int | float | str | bool] = Field(min_length=1)


class IntRange(_Entry):
    type: Literal["int"]
    low: int
    high: int
    step: int = Field(1, ge=1)
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> IntRange:
        _check_range(self.low, self.high, self.log)
        if self.log and self.step != 1:
            raise ValueError("log-scaled int ranges need step 1 (Optuna's rule)")
        return self

    def values(self) -> list[int]:
        return list(range(self.low, self.high + 1, self.step))


class FloatRange(_Entry):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> FloatRange:
        _check_range(self.low, self.high, self.log)
        return self


Dimension = Annotated[Categorical | IntRange | FloatRange, Field(discriminator="type")]


def _check_range(low: float, high: float, log: bool) -> None:
    if low > high:
        raise ValueError(f"low {low} > high {high}")
    if log and low <= 0:
        raise ValueError(f"log scale needs low > 0, got {low}")


def check_odd_kernels(dim: Any) -> None:
    if isinstance(dim, FloatRange):
        raise ValueError("'base_kernels' must be 'int' or 'categorical' (kernel sizes are odd integers)")
    values = dim.values() if isinstance(dim, IntRange) else dim.choices
    even = [v for v in values if not isinstance(v, int) or v < 1 or v % 2 == 0]
    if even:
        hint = " (use an odd low and an even step)" if isinstance(dim, IntRange) else ""
        raise ValueError(f"'base_kernels' must sample odd sizes >= 1; {even} would be sampled{hint}")


def in_space(dim: Any, value: Any) -> bool:
    """Whether `value` is one the dimension can sample."""
    if isinstance(dim, Categorical):
        return value in dim.choices
    if isinstance(dim, IntRange):
        return isinstance(value, int) and value in dim.values()
    return dim.low <= value <= dim.high


def extremes(dim: Any) -> list[Any]:
    """The values that bound what a dimension can sample (all choices; low and high)."""
    if isinstance(dim, Categorical):
        return list(dim.choices)
    if isinstance(dim, IntRange):
        return [dim.low, dim.values()[-1]]
    return [dim.low, dim.high]


def apply_values(raw: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """Sampled values written into a params dict (as params.yaml holds it), in place."""
    for name, value in values.items():
        section = raw.setdefault(TUNABLE[name], {})
        section[name] = [value, value] if name == "base_kernels" else value
    return raw


def current_values(model: BaseModel, train: BaseModel, names: list[str]) -> dict[str, Any]:
    """The params.yaml values of the tuned names (base_kernels as its first size)."""
    sections = {"model": model, "train": train}
    out = {name: getattr(sections[TUNABLE[name]], name) for name in names}
    if "base_kernels" in out:
        out["base_kernels"] = out["base_kernels"][0]
    return out
