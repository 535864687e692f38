"""DP-FedAvg: clipping, noise, adaptive clipping, and the accountant against numbers computed
by hand (the reference computation is in the comments and in docs/security.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from leukofed import privacy


def hand_epsilon(z: float, rounds: int, delta: float, q: float, orders: range) -> float:
    """Independent reference: RDP of the sampled Gaussian at integer order a (Mironov, Talwar,
    Zhang 2019, Eq. 3): A_a = sum_k C(a,k) (1-q)^(a-k) q^k exp((k^2-k) / (2 z^2)),
    RDP(a) = log(A_a) / (a-1), times the rounds; for q = 1 this is a / (2 z^2). Then
    eps = min_a RDP(a) + log(1 - 1/a) - log(delta a) / (a-1) (Balle et al. 2020, Prop. 12)."""
    best = math.inf
    for a in orders:
        a_sum = sum(math.comb(a, k) * (1 - q) ** (a - k) * q ** k
                    * math.exp((k * k - k) / (2 * z * z)) for k in range(a + 1))
        rdp = rounds * math.log(a_sum) / (a - 1)
        best = min(best, rdp + math.log1p(-1 / a) - math.log(delta * a) / (a - 1))
    return best


def test_accountant_matches_the_hand_computed_value() -> None:
    # z = 1, one round, everyone takes part, delta = 1e-5. RDP(a) = a/2; best integer a = 5:
    # 5/2 + ln(4/5) - ln(5e-5)/4 = 2.5 - 0.223144 + 9.903488/4 = 4.752728
    assert privacy.epsilon(1.0, 1, 1e-5) == pytest.approx(4.752728, abs=1e-6)
    # a = 4 gives 2 + ln(3/4) - ln(4e-5)/3 = 2 - 0.287682 + 3.375328 = 5.087646 (worse), and
    # a = 6 gives 3 + ln(5/6) - ln(6e-5)/5 = 4.761912 (worse): 5 is the minimum.
    assert hand_epsilon(1.0, 1, 1e-5, 1.0, range(2, 33)) == pytest.approx(4.752728, abs=1e-6)


@pytest.mark.parametrize(("z", "rounds", "q"), [(1.0, 10, 0.5), (1.1, 100, 0.1), (2.0, 50, 1.0)])
def test_sampled_gaussian_matches_the_independent_formula(z: float, rounds: int, q: float
                                                          ) -> None:
    orders = range(2, 33)
    got = privacy.epsilon(z, rounds, 1e-5, q, [float(a) for a in orders])
    assert got == pytest.approx(hand_epsilon(z, rounds, 1e-5, q, orders), rel=1e-9)


def test_epsilon_edges_and_budget() -> None:
    assert privacy.epsilon(1.0, 0, 1e-5) == 0.0
    assert privacy.epsilon(0.0, 3, 1e-5) == math.inf
    assert privacy.epsilon(1.0, 20, 1e-5) > privacy.epsilon(1.0, 10, 1e-5)
    assert privacy.epsilon(1.0, 10, 1e-5, 0.2) < privacy.epsilon(1.0, 10, 1e-5)  # sampling
    n = privacy.rounds_within(1.0, 10.0, 1e-5)
    assert privacy.epsilon(1.0, n, 1e-5) <= 10.0 < privacy.epsilon(1.0, n + 1, 1e-5)


def w(*values: float) -> dict[str, np.ndarray]:
    return {"k": np.array(values, np.float32), "step": np.array(7, np.int64)}


def test_clipping_and_noise_free_central_mean_by_hand() -> None:
    g = w(0, 0)
    # deltas (3, 4) norm 5 -> clipped to norm 1: (0.6, 0.8); (0.3, 0.4) norm 0.5 kept.
    d, norm = privacy.clipped_delta(g, w(3, 4), 1.0)
    assert norm == pytest.approx(5.0)
    np.testing.assert_allclose(d["k"], [0.6, 0.8])
    assert "step" not in d  # integer tensors are not model parameters
    out = privacy.central_mean(g, [w(3, 4), w(0.3, 0.4)], num_selected=3, clip_norm=1.0,
                               noise_multiplier=0.0, rng=np.random.default_rng(0))
    # (0.6 + 0.3) / 3 = 0.3 ; (0.8 + 0.4) / 3 = 0.4 : the denominator counts every hospital asked
    np.testing.assert_allclose(out.weights["k"], [0.3, 0.4], rtol=1e-6)
    assert out.weights["step"] == 7 and out.clipped_fraction == 0.5
    assert out.next_clip_norm == 1.0


def test_noise_has_the_calibrated_scale() -> None:
    g = {"k": np.zeros(200_000, np.float32)}
    out = privacy.central_mean(g, [g, g], num_selected=2, clip_norm=0.5, noise_multiplier=2.0,
                               rng=np.random.default_rng(1))
    # std of the mean = z C / n = 2 * 0.5 / 2 = 0.5
    assert float(np.std(out.weights["k"])) == pytest.approx(0.5, rel=0.01)


def test_adaptive_clipping_moves_towards_the_quantile() -> None:
    g = w(0, 0)
    small = [w(0.1, 0), w(0, 0.1)]
    out = privacy.central_mean(g, small, 2, 1.0, 0.0, np.random.default_rng(0), adaptive=True,
                               target_quantile=0.5, clip_learning_rate=0.2)
    # all unclipped: 1.0 * exp(-0.2 * (1.0 - 0.5)) = exp(-0.1) = 0.904837
    assert out.next_clip_norm == pytest.approx(math.exp(-0.1))
    # the privacy split: z = 1, sigma_b = 1 -> z_delta = (1 - 1/4)^-1/2 = 1.154701
    assert privacy.adaptive_split(1.0, 1.0) == pytest.approx(1.154701, abs=1e-6)
    with pytest.raises(ValueError):
        privacy.adaptive_split(1.0, 0.4)


def test_local_mode_clips_and_noises_the_update() -> None:
    g = {"k": np.zeros(100_000, np.float32)}
    u = {"k": np.full(100_000, 1.0, np.float32)}  # norm sqrt(1e5) = 316
    out = privacy.privatize_local(g, u, clip_norm=1.0, noise_multiplier=0.0,
                                  rng=np.random.default_rng(0))
    assert privacy.delta_norm(g, out) == pytest.approx(1.0, rel=1e-5)
    noisy = privacy.privatize_local(g, u, 1.0, 0.1, np.random.default_rng(0))
    assert float(np.std(noisy["k"] - out["k"])) == pytest.approx(0.1, rel=0.02)


# --- the round loop with DP (fakes from test_round_loop) ------------------------------------


def test_round_loop_central_dp_logs_epsilon_and_stops_at_the_target(tmp_path) -> None:
    from test_round_loop import Clock, FakeDispatcher, FakeTracker, honest, make_run

    clock, tracker = Clock(), FakeTracker()
    d = FakeDispatcher(clock, {"a": honest(1.0, 1), "b": honest(3.0, 3)}, live={"a", "b"})
    # z = 1, no sampling: eps(1) = 4.75, eps(2) = 7.09, eps(3) = 9.09 at delta 1e-5 -> a
    # target of 8 allows two of the five rounds asked for.
    run = make_run(tmp_path, d, clock, tracker, rounds=5, min_fit_clients=2,
                   privacy={"noise_multiplier": 1.0, "clip_norm": 0.5, "target_epsilon": 8.0})
    rec = run.execute()
    assert rec["status"] == "completed" and "privacy budget reached after 2 rounds" in rec["reason"]
    eps = [r["privacy"]["epsilon"] for r in rec["rounds"]]
    assert eps == [pytest.approx(privacy.epsilon(1.0, n, 1e-5)) for n in (1, 2)]
    assert rec["rounds"][1]["global"]["dp_epsilon"] == eps[1]  # logged to MLflow per round
    assert rec["rounds"][0]["privacy"]["clipped_fraction"] == 1.0  # deltas of norm 2 and 6
    assert tracker.logged == [1, 2]


def test_round_loop_local_dp_sends_the_parameters_to_hospitals(tmp_path) -> None:
    from test_round_loop import Clock, FakeDispatcher, honest, make_run

    clock = Clock()
    d = FakeDispatcher(clock, {"a": honest(0.1, 1), "b": honest(0.1, 1)}, live={"a", "b"})
    run = make_run(tmp_path, d, clock, rounds=1, min_fit_clients=2,
                   privacy={"mode": "local", "noise_multiplier": 0.5, "clip_norm": 2.0})
    rec = run.execute()
    assert rec["status"] == "completed", rec["reason"]
    fit = next(c for _, task, c in d.sent if task.endswith("fit"))
    assert (fit["dp_mode"], fit["dp_clip_norm"], fit["dp_noise_multiplier"]) == ("local", 2.0, 0.5)
    assert rec["rounds"][0]["privacy"]["epsilon"] == pytest.approx(privacy.epsilon(0.5, 1, 1e-5))
