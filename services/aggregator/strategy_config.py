"""Each aggregation strategy's parameters as a typed model, so the aggregator's OpenAPI page
lists them (with defaults and meaning) instead of an untyped map, and a parameter the chosen
strategy does not take is a 422 that says which ones it does take.

The ranges are checked where the strategies are built (leukofed.strategies.make_strategy,
called by RunConfig's validation), with one message per parameter. A test keeps these
models and the strategies' keyword arguments the same.
"""

from __future__ import annotations

from typing import Any, Union

from pydantic import BaseModel, ConfigDict, Field


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FedAvgParams(_Params):
    """fedavg: example-weighted average of the updates (no parameter)."""


class FedProxParams(_Params):
    """fedprox: FedAvg on the server; hospitals add a proximal term to their loss."""

    mu: float = Field(0.01, description="proximal term weight (>= 0): (mu/2)||w - w_global||^2")


class FedAvgMParams(_Params):
    """fedavgm: FedAvg with server momentum."""

    server_lr: float = Field(1.0, description="server learning rate (> 0)")
    momentum: float = Field(0.9, description="server momentum, in [0, 1)")


class _FedOptParams(_Params):
    eta: float = Field(1e-2, description="server learning rate (> 0)")
    eta_l: float | None = Field(None, description="client learning rate: accepted, unused "
                                "(the run's learning_rate goes to the hospitals)")
    beta_1: float = Field(0.9, description="first-moment decay, in [0, 1)")
    beta_2: float = Field(0.99, description="second-moment decay, in [0, 1)")
    tau: float = Field(1e-3, description="adaptivity (> 0): v starts at tau^2")


class FedAdamParams(_FedOptParams):
    """fedadam: server Adam (Reddi et al. 2021)."""


class FedYogiParams(_FedOptParams):
    """fedyogi: server Yogi (Reddi et al. 2021)."""


class FedAdagradParams(_FedOptParams):
    """fedadagrad: server Adagrad (Reddi et al. 2021)."""

    eta: float = Field(1e-1, description="server learning rate (> 0)")


class FedMedianParams(_Params):
    """fedmedian: coordinate-wise median, unweighted (no parameter)."""


class FedTrimmedAvgParams(_Params):
    """fedtrimmedavg: coordinate-wise mean without the extremes, unweighted."""

    beta: float = Field(0.2, description="share trimmed at each end, in [0, 0.5)")


class KrumParams(_Params):
    """krum: the update with the lowest Krum score becomes the next model."""

    num_malicious: int = Field(1, description="hospitals assumed malicious (>= 0)")


class MultiKrumParams(_Params):
    """multikrum: average of the updates with the lowest Krum scores."""

    num_malicious: int = Field(1, description="hospitals assumed malicious (>= 0)")
    num_selected: int | None = Field(None, description="updates averaged (>= 1); default: "
                                     "n - num_malicious")


STRATEGY_PARAMS: dict[str, type[_Params]] = {
    "fedavg": FedAvgParams, "fedprox": FedProxParams, "fedavgm": FedAvgMParams,
    "fedadam": FedAdamParams, "fedyogi": FedYogiParams, "fedadagrad": FedAdagradParams,
    "fedmedian": FedMedianParams, "fedtrimmedavg": FedTrimmedAvgParams, "krum": KrumParams,
    "multikrum": MultiKrumParams,
}

StrategyParams = Union[  # noqa: UP007 (pydantic reads the union at runtime)
    FedAvgParams, FedProxParams, FedAvgMParams, FedAdamParams, FedYogiParams,
    FedAdagradParams, FedMedianParams, FedTrimmedAvgParams, KrumParams, MultiKrumParams]


def typed_params(strategy: object, params: object) -> object:
    """``params`` (a map from the request or a stored record) as the model of ``strategy``;
    ValueError naming the strategy or the parameters it does not take. Anything that is not
    a known name and a map is left for the field validation to refuse."""
    key = strategy.strip().lower() if isinstance(strategy, str) else strategy
    if key not in STRATEGY_PARAMS:
        raise ValueError(f"unknown strategy {strategy!r}; choose from "
                         f"{sorted(STRATEGY_PARAMS)}")
    cls = STRATEGY_PARAMS[str(key)]
    if params is None:
        params = {}
    if isinstance(params, BaseModel):
        params = params.model_dump()
    if not isinstance(params, dict):
        return params
    unknown = set(params) - set(cls.model_fields)
    if unknown:
        raise ValueError(f"strategy: {key} does not take {sorted(unknown)}; it takes "
                         f"{sorted(cls.model_fields)}")
    return cls.model_validate(params)


def as_kwargs(params: BaseModel) -> dict[str, Any]:
    """The parameters as leukofed.strategies.make_strategy takes them."""
    return params.model_dump()
