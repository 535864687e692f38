"""Each strategy against numbers worked out by hand (in the comments), not by the same code."""

from __future__ import annotations

import numpy as np
import pytest

from leukofed.strategies import (
    STRATEGIES,
    ClientResult,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    make_strategy,
    pool_batchnorm_stats,
    strategy_params,
    weighted_average,
)
from leukofed.wire import decode_weights, encode_weights


def f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def result(name: str, n: int, **tensors: np.ndarray) -> ClientResult:
    return ClientResult(hospital=name, weights=dict(tensors), num_examples=n, metrics={})


def test_weighted_average_by_hand() -> None:
    updates = [{"w": f32(1, 2), "c": np.array(7, np.int64)},
               {"w": f32(4, 8), "c": np.array(9, np.int64)}]
    out = weighted_average(updates, [1, 3])
    # (1*1 + 3*4) / 4 = 13/4 = 3.25 ; (1*2 + 3*8) / 4 = 26/4 = 6.5
    np.testing.assert_allclose(out["w"], [3.25, 6.5])
    assert out["w"].dtype == np.float32
    assert out["c"] == 7 and out["c"].dtype == np.int64  # integers: from the first update


@pytest.mark.parametrize("weights", [[0, 0], [1, -1], [1, float("nan")], [1]])
def test_weighted_average_rejects_bad_weights(weights: list[float]) -> None:
    with pytest.raises(ValueError):
        weighted_average([{"w": f32(1)}, {"w": f32(2)}], weights)


def test_fedavg_is_example_weighted() -> None:
    g = {"w": f32(0, 0)}
    out = FedAvg().aggregate(g, [result("a", 1, w=f32(1, 2)), result("b", 3, w=f32(4, 8))], 1)
    np.testing.assert_allclose(out["w"], [3.25, 6.5])  # as in test_weighted_average_by_hand
    assert out["w"].dtype == np.float32 and list(out) == ["w"]


def test_fedavg_ignores_results_without_examples() -> None:
    out = FedAvg().aggregate({"w": f32(0)}, [result("a", 2, w=f32(1)),
                                             result("b", 0, w=f32(100))], 1)
    np.testing.assert_allclose(out["w"], [1.0])


def test_fedprox_averages_and_sends_mu() -> None:
    s = FedProx(mu=0.1)
    assert s.configure_fit(1) == {"proximal_mu": 0.1}
    out = s.aggregate({"w": f32(0)}, [result("a", 1, w=f32(2)), result("b", 1, w=f32(4))], 1)
    np.testing.assert_allclose(out["w"], [3.0])  # (2 + 4) / 2
    assert FedAvg().configure_fit(1) == {}


def test_fedavgm_by_hand() -> None:
    s = FedAvgM(server_lr=1.0, momentum=0.9)
    # round 1: x0 = 0, avg = 1 -> delta = 1; m = 0.9*0 + 1 = 1; x1 = 0 + 1*1 = 1
    x1 = s.aggregate({"w": f32(0)}, [result("a", 1, w=f32(1))], 1)
    np.testing.assert_allclose(x1["w"], [1.0])
    # round 2: avg = 1.5 -> delta = 0.5; m = 0.9*1 + 0.5 = 1.4; x2 = 1 + 1.4 = 2.4
    x2 = s.aggregate(x1, [result("a", 1, w=f32(1.5))], 2)
    np.testing.assert_allclose(x2["w"], [2.4], rtol=1e-6)
    np.testing.assert_allclose(s.state()["momentum/w"], [1.4])
    assert s.state()["t"] == 2


def test_fedavgm_with_lr_one_and_no_momentum_is_fedavg() -> None:
    s = FedAvgM(server_lr=1.0, momentum=0.0)
    out = s.aggregate({"w": f32(0, 0)}, [result("a", 1, w=f32(1, 2)),
                                         result("b", 3, w=f32(4, 8))], 1)
    np.testing.assert_allclose(out["w"], [3.25, 6.5])


def test_fedadam_by_hand() -> None:
    s = FedAdam(eta=0.6, beta_1=0.5, beta_2=0.5, tau=1.0)  # v starts at tau^2 = 1
    # round 1: avg of 6 and 8 = 7 -> delta = 7
    #   m1 = 0.5*0 + 0.5*7 = 3.5 ; v1 = 0.5*1 + 0.5*49 = 25 ; sqrt(v1) + tau = 6
    #   x1 = 0 + 0.6 * 3.5 / 6 = 0.35
    x1 = s.aggregate({"w": f32(0)}, [result("a", 1, w=f32(6)), result("b", 1, w=f32(8))], 1)
    np.testing.assert_allclose(x1["w"], [0.35], rtol=1e-6)
    # round 2: avg = 5.35 -> delta = 5
    #   m2 = 0.5*3.5 + 0.5*5 = 4.25 ; v2 = 0.5*25 + 0.5*25 = 25 ; x2 = 0.35 + 0.6*4.25/6 = 0.775
    x2 = s.aggregate(x1, [result("a", 1, w=f32(5.35))], 2)
    np.testing.assert_allclose(x2["w"], [0.775], rtol=1e-6)
    np.testing.assert_allclose(s.state()["m/w"], [4.25], rtol=1e-6)
    np.testing.assert_allclose(s.state()["v/w"], [25.0], rtol=1e-6)


def test_fedadam_defaults_by_hand() -> None:
    s = FedAdam()  # eta 1e-2, beta_1 0.9, beta_2 0.99, tau 1e-3
    # delta = 1: m = 0.1 ; v = 0.99*1e-6 + 0.01*1 = 0.01000099 ; sqrt(v) = 0.1000049499
    # x = 0.01 * 0.1 / (0.1000049499 + 0.001) = 0.0099005049
    out = s.aggregate({"w": f32(0)}, [result("a", 1, w=f32(1))], 1)
    np.testing.assert_allclose(out["w"], [0.0099005049], rtol=1e-6)


def test_fedyogi_by_hand() -> None:
    s = FedYogi(eta=1.0, beta_1=0.5, beta_2=0.5, tau=1.0)  # v starts at 1
    # round 1: delta = 4, delta^2 = 16 > v0 = 1 so sign(v0 - 16) = -1:
    #   m1 = 0.5*4 = 2 ; v1 = 1 + 0.5*16 = 9 (Adam would give 0.5*1 + 0.5*16 = 8.5)
    #   x1 = 0 + 2 / (3 + 1) = 0.5
    x1 = s.aggregate({"w": f32(0)}, [result("a", 1, w=f32(4))], 1)
    np.testing.assert_allclose(x1["w"], [0.5])
    np.testing.assert_allclose(s.state()["v/w"], [9.0])
    # round 2: avg 2.5 -> delta = 2, delta^2 = 4 < v1 = 9 so sign = +1:
    #   m2 = 0.5*2 + 0.5*2 = 2 ; v2 = 9 - 0.5*4 = 7 (Adam: 0.5*9 + 0.5*4 = 6.5)
    #   x2 = 0.5 + 2 / (sqrt(7) + 1) = 0.5 + 2 / 3.6457513 = 1.0485838
    x2 = s.aggregate(x1, [result("a", 1, w=f32(2.5))], 2)
    np.testing.assert_allclose(s.state()["v/w"], [7.0])
    np.testing.assert_allclose(x2["w"], [1.0485838], rtol=1e-6)


def test_fedadagrad_by_hand() -> None:
    s = FedAdagrad(eta=1.0, beta_1=0.5, tau=0.75)  # v starts at 0.75^2 = 0.5625
    # round 1: delta = 1: m1 = 0.5 ; v1 = 0.5625 + 1 = 1.5625 = 1.25^2
    #   x1 = 0 + 0.5 / (1.25 + 0.75) = 0.25
    x1 = s.aggregate({"w": f32(0)}, [result("a", 1, w=f32(1))], 1)
    np.testing.assert_allclose(x1["w"], [0.25])
    # round 2: avg 3.25 -> delta = 3: m2 = 0.25 + 1.5 = 1.75 ; v2 = 1.5625 + 9 = 10.5625 = 3.25^2
    #   x2 = 0.25 + 1.75 / (3.25 + 0.75) = 0.25 + 0.4375 = 0.6875
    x2 = s.aggregate(x1, [result("a", 1, w=f32(3.25))], 2)
    np.testing.assert_allclose(x2["w"], [0.6875])
    np.testing.assert_allclose(s.state()["v/w"], [10.5625])


def test_fedmedian_by_hand_ignores_example_counts() -> None:
    g = {"w": f32(0, 0)}
    odd = [result("a", 1, w=f32(1, -5)), result("b", 1000, w=f32(10, 0)),
           result("c", 1, w=f32(2, 3))]
    # medians: {1, 10, 2} -> 2 ; {-5, 0, 3} -> 0
    np.testing.assert_allclose(FedMedian().aggregate(g, odd, 1)["w"], [2, 0])
    even = [*odd, result("d", 1, w=f32(3, 100))]
    # {1, 2, 3, 10} -> (2 + 3) / 2 = 2.5 ; {-5, 0, 3, 100} -> (0 + 3) / 2 = 1.5
    np.testing.assert_allclose(FedMedian().aggregate(g, even, 1)["w"], [2.5, 1.5])


def test_fedtrimmedavg_by_hand() -> None:
    g = {"w": f32(0)}
    four = [result(h, 1, w=f32(v)) for h, v in zip("abcd", (1, 2, 3, 100), strict=True)]
    # beta 0.25 of 4 -> cut 1 each end: mean(2, 3) = 2.5
    np.testing.assert_allclose(FedTrimmedAvg(beta=0.25).aggregate(g, four, 1)["w"], [2.5])
    five = [result(h, 1, w=f32(v)) for h, v in zip("abcde", (-50, 1, 2, 3, 100), strict=True)]
    # beta 0.2 of 5 -> cut 1 each end: mean(1, 2, 3) = 2
    np.testing.assert_allclose(FedTrimmedAvg(beta=0.2).aggregate(g, five, 1)["w"], [2.0])
    # beta 0.2 of 4 -> int(0.8) = 0, nothing cut: (1 + 2 + 3 + 100) / 4 = 26.5
    np.testing.assert_allclose(FedTrimmedAvg(beta=0.2).aggregate(g, four, 1)["w"], [26.5])


# --- BatchNorm statistics and non-float tensors ---------------------------------------------

BN = {"bn/moving_mean", "bn/moving_variance"}


def bn_global() -> dict[str, np.ndarray]:
    return {"k": f32(0), "bn/moving_mean": f32(0), "bn/moving_variance": f32(1),
            "count": np.array(5, np.int64)}


def bn_results() -> list[ClientResult]:
    return [
        result("a", 1, k=f32(7), **{"bn/moving_mean": f32(1), "bn/moving_variance": f32(0.5)},
               count=np.array(11, np.int64)),
        result("b", 3, k=f32(7), **{"bn/moving_mean": f32(3), "bn/moving_variance": f32(0.1)},
               count=np.array(12, np.int64)),
    ]


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_bn_average_mode_plainly_averages_stats_in_every_strategy(name: str) -> None:
    s = make_strategy(name, bn_stat_names=BN)
    out = s.aggregate(bn_global(), bn_results(), 1)
    # moving_mean: (1*1 + 3*3) / 4 = 2.5 ; moving_variance: (1*0.5 + 3*0.1) / 4 = 0.8/4 = 0.2
    np.testing.assert_allclose(out["bn/moving_mean"], [2.5])
    np.testing.assert_allclose(out["bn/moving_variance"], [0.2], rtol=1e-6)
    assert out["count"] == 11 and out["count"].dtype == np.int64  # first result's counter
    assert list(out) == list(bn_global())
    assert all(key.split("/", 1)[-1] == "k" for key in s.state() if key != "t")


def test_adaptive_optimizer_acts_on_weights_only() -> None:
    s = FedAdam(eta=0.6, beta_1=0.5, beta_2=0.5, tau=1.0, bn_stat_names=BN)
    out = s.aggregate(bn_global(), bn_results(), 1)
    np.testing.assert_allclose(out["k"], [0.35], rtol=1e-6)  # delta 7, as in the Adam test
    np.testing.assert_allclose(out["bn/moving_mean"], [2.5])  # not an Adam step


def test_bn_local_mode_still_gives_the_served_global_model_averaged_stats() -> None:
    # FedBN: clients keep their own statistics (client side); the global model, which is
    # registered and served, gets the plain average instead of its initial 0 / 1.
    s = FedAvg(bn_mode="local", bn_stat_names=BN)
    out = s.aggregate(bn_global(), bn_results(), 1)
    np.testing.assert_allclose(out["k"], [7.0])
    np.testing.assert_allclose(out["bn/moving_mean"], [2.5])
    np.testing.assert_allclose(out["bn/moving_variance"], [0.2], rtol=1e-6)


def test_without_bn_names_stats_follow_the_strategy() -> None:
    out = FedMedian().aggregate(bn_global(), bn_results()[:1] * 2 + bn_results()[1:], 1)
    np.testing.assert_allclose(out["bn/moving_mean"], [1.0])  # median of {1, 1, 3}


def test_unknown_bn_names_are_an_error() -> None:
    with pytest.raises(ValueError, match="bn_stat_names"):
        FedAvg(bn_stat_names={"nope/moving_mean"}).aggregate(bn_global(), bn_results(), 1)


# --- state checkpointing ---------------------------------------------------------------------

def rounds() -> list[list[ClientResult]]:
    rng = np.random.default_rng(0)
    return [[ClientResult(h, {"k": rng.normal(size=(3, 2)).astype(np.float32),
                              "b": rng.normal(size=2).astype(np.float32)}, n, {})
             for h, n in (("a", 10), ("b", 30))] for _ in range(3)]


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_state_round_trip_resumes_identically(name: str) -> None:
    data = rounds()
    g0 = {"k": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}
    a = make_strategy(name)
    g = a.aggregate(g0, data[0], 1)
    g = a.aggregate(g, data[1], 2)
    # checkpoint through the wire format, as the aggregator may do
    state = decode_weights(encode_weights({k: np.asarray(v) for k, v in a.state().items()}))
    b = make_strategy(name)
    b.load_state(state)
    continued, resumed = a.aggregate(g, data[2], 3), b.aggregate(g, data[2], 3)
    for key in g0:
        np.testing.assert_array_equal(continued[key], resumed[key])
    assert a.state().keys() == b.state().keys()


def test_fresh_instance_differs_from_resumed_one() -> None:
    data, g0 = rounds(), {"k": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}
    a = FedAdam()
    g = a.aggregate(a.aggregate(g0, data[0], 1), data[1], 2)
    fresh = FedAdam().aggregate(g, data[2], 3)
    assert not np.array_equal(a.aggregate(g, data[2], 3)["k"], fresh["k"])


def test_load_state_rejects_foreign_keys() -> None:
    with pytest.raises(ValueError):
        FedAdam().load_state({"momentum/k": np.zeros(1)})
    with pytest.raises(ValueError):
        FedAvg().load_state({"t": 3})
    FedAvg().load_state({})


def test_state_of_another_model_is_an_error() -> None:
    s = FedAdam()
    s.load_state({"t": 1, "m/other": np.zeros(1), "v/other": np.ones(1)})
    with pytest.raises(ValueError, match="another model"):
        s.aggregate({"w": f32(0)}, [result("a", 1, w=f32(1))], 2)


# --- input checks and the registry -----------------------------------------------------------

def test_aggregate_input_errors() -> None:
    g = {"w": f32(0)}
    with pytest.raises(ValueError, match="nothing to aggregate"):
        FedAvg().aggregate(g, [], 1)
    with pytest.raises(ValueError, match="nothing to aggregate"):
        FedAvg().aggregate(g, [result("a", 0, w=f32(1))], 1)
    with pytest.raises(ValueError, match="num_examples"):
        FedAvg().aggregate(g, [result("a", -1, w=f32(1))], 1)
    with pytest.raises(ValueError, match="names differ"):
        FedAvg().aggregate(g, [result("a", 1, v=f32(1))], 1)


def test_aggregate_does_not_mutate_inputs() -> None:
    g, r = {"w": f32(1)}, result("a", 1, w=f32(3))
    out = FedYogi().aggregate(g, [r], 1)
    assert g["w"][0] == 1 and r.weights["w"][0] == 3 and out["w"] is not g["w"]


def test_registry_names() -> None:
    assert set(STRATEGIES) == {"fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi",
                               "fedadagrad", "fedmedian", "fedtrimmedavg", "krum",
                               "multikrum"}
    assert isinstance(make_strategy(" FedAdam "), FedAdam)
    assert strategy_params(FedAdagrad) >= {"eta", "eta_l", "beta_1", "beta_2", "tau",
                                           "bn_mode", "bn_stat_names"}
    s = make_strategy("fedyogi", eta=0.05, bn_mode="local")
    assert s.params == {"bn_mode": "local", "eta": 0.05, "beta_1": 0.9, "beta_2": 0.99,
                        "tau": 1e-3}


@pytest.mark.parametrize(("name", "params", "match"), [
    ("fedsgd", {}, "unknown strategy"),
    ("fedadam", {"eta": -0.1}, "eta"),
    ("fedadam", {"eta": 0}, "eta"),
    ("fedadam", {"beta_1": 1.0}, "beta_1"),
    ("fedyogi", {"tau": "1e-3"}, "tau"),
    ("fedavgm", {"momentum": True}, "momentum"),
    ("fedavgm", {"server_lr": float("inf")}, "server_lr"),
    ("fedprox", {"mu": -1}, "mu"),
    ("fedtrimmedavg", {"beta": 0.5}, "beta"),
    ("fedavg", {"mu": 0.1}, "does not take"),
    ("fedavg", {"bn_mode": "fedbn"}, "bn_mode"),
    ("fedavg", {"bn_stat_names": "bn/moving_mean"}, "bn_stat_names"),
])
def test_make_strategy_rejects_bad_configs(name: str, params: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_strategy(name, **params)


def test_pooled_batchnorm_stats_equal_those_of_the_union() -> None:
    # Hospital a saw activations [1, 3] (mean 2, var 1), b saw [5, 7, 9] (mean 7, var 8/3).
    # Their union [1, 3, 5, 7, 9] has mean 5 and variance (16 + 4 + 0 + 4 + 16) / 5 = 8:
    # the spread between the hospitals' means counts, which a plain average (1.83) misses.
    a = {"bn/moving_mean": np.array([2.0], np.float32),
         "bn/moving_variance": np.array([1.0], np.float32)}
    b = {"bn/moving_mean": np.array([7.0], np.float32),
         "bn/moving_variance": np.array([8 / 3], np.float32)}
    pooled = pool_batchnorm_stats([a, b], [2, 3])
    np.testing.assert_allclose(pooled["bn/moving_mean"], [5.0], rtol=1e-6)
    np.testing.assert_allclose(pooled["bn/moving_variance"], [8.0], rtol=1e-6)
    assert pooled["bn/moving_variance"].dtype == np.float32
    data = np.array([1, 3, 5, 7, 9], np.float64)  # the same, computed from the union
    assert pooled["bn/moving_variance"][0] == pytest.approx(data.var(), rel=1e-6)
    # A tensor without its mean partner is example-weighted.
    lone = pool_batchnorm_stats([{"x/moving_variance": np.ones(1)},
                                 {"x/moving_variance": np.full(1, 5.0)}], [3, 1])
    np.testing.assert_allclose(lone["x/moving_variance"], [2.0])
    with pytest.raises(ValueError):
        pool_batchnorm_stats([a, b], [2, 0, 1])


def test_only_averaging_strategies_leave_batchnorm_stats_to_the_average() -> None:
    averaging = {n for n, cls in STRATEGIES.items() if cls.weights_are_client_average}
    assert averaging == {"fedavg", "fedprox"}


def test_robust_pooling_takes_the_median_so_one_hospital_cannot_move_it() -> None:
    honest = [{"bn/moving_mean": np.array([m], np.float32),
               "bn/moving_variance": np.array([v], np.float32)} for m, v in ((1, 1), (2, 2))]
    wild = {"bn/moving_mean": np.array([1e4], np.float32),
            "bn/moving_variance": np.array([1e4], np.float32)}
    pooled = pool_batchnorm_stats([*honest, wild], [1, 1, 10_000], robust=True)
    np.testing.assert_allclose(pooled["bn/moving_mean"], [2.0])  # a big count buys nothing
    np.testing.assert_allclose(pooled["bn/moving_variance"], [2.0])
    assert pool_batchnorm_stats([*honest, wild], [1, 1, 1])["bn/moving_mean"][0] > 3000
    robust = {n for n, cls in STRATEGIES.items() if cls.robust}
    assert robust == {"fedmedian", "fedtrimmedavg", "krum", "multikrum"}
