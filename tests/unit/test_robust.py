"""Robust aggregation: Krum and multi-Krum against hand-computed numbers, and a poisoning
simulation in which one hospital of five sends sign-flipped, scaled updates: FedAvg is
dragged away while median, trimmed mean and (multi-)Krum keep the accuracy.

The simulation trains real compact CNNs (leukofed.train) in-process on tiny synthetic
images, without Celery: the strategies are what is under test, not the transport."""

from __future__ import annotations

import numpy as np
import pytest

from leukofed.strategies import (
    STRATEGIES,
    ClientResult,
    Krum,
    MultiKrum,
    krum_scores,
    krum_select,
    make_strategy,
    pool_batchnorm_stats,
)


def test_krum_scores_by_hand() -> None:
    # Five points on a line: 0, 1, 3, 5, 20; f = 1 so each sums its n - f - 2 = 2 nearest.
    # 0: squared distances 1, 9, 25, 400   -> 1 + 9  = 10
    # 1: 1, 4, 16, 361                     -> 1 + 4  = 5
    # 3: 9, 4, 4, 289                      -> 4 + 4  = 8
    # 5: 25, 16, 4, 225                    -> 4 + 16 = 20
    # 20: 400, 361, 289, 225               -> 225 + 289 = 514
    points = [np.array([v], float) for v in (0, 1, 3, 5, 20)]
    np.testing.assert_allclose(krum_scores(points, 1), [10, 5, 8, 20, 514])
    assert krum_select(points, 1, 1) == [1]
    assert krum_select(points, 1, 3) == [0, 1, 2]  # scores 5, 8, 10
    # 2-D: distances are over the whole flattened update, not per coordinate
    # (0,0),(1,0),(0,1),(9,9); f=0 -> 2 nearest. (0,0): 1+1=2; (1,0): 1+2=3; (0,1): 1+2=3;
    # (9,9): 145+145=290 (|9-1|^2+|9-0|^2 = 64+81)
    square = [np.array(p, float) for p in ((0, 0), (1, 0), (0, 1), (9, 9))]
    np.testing.assert_allclose(krum_scores(square, 0), [2, 3, 3, 290])


def result(h: str, n: int, w: list[float], b: float) -> ClientResult:
    return ClientResult(h, {"w": np.array(w, np.float32), "b": np.array([b], np.float32)}, n)


def test_krum_and_multikrum_strategies_by_hand() -> None:
    g = {"w": np.zeros(2, np.float32), "b": np.zeros(1, np.float32)}
    # Vectors (w0, w1, b): a=(1,0,0), b=(0,1,0), c=(1,1,0), d=(1,1,1), e=(-50,-50,-50).
    # f=1 -> 2 nearest. a: to b 2, c 1, d 2 -> 1+2 = 3; b: same, 3; c: to a 1, b 1 -> 2;
    # d: to c 1, a 2 -> 3; e: far -> huge. Krum keeps c; multi-Krum (n - f = 4) drops e.
    results = [result("a", 10, [1, 0], 0), result("b", 10, [0, 1], 0),
               result("c", 10, [1, 1], 0), result("d", 10, [1, 1], 1),
               result("e", 10_000, [-50, -50], -50)]  # a big claimed count buys nothing
    out = Krum(num_malicious=1).aggregate(g, results, 1)
    np.testing.assert_allclose(out["w"], [1, 1])
    np.testing.assert_allclose(out["b"], [0])
    mk = MultiKrum(num_malicious=1)
    out = mk.aggregate(g, results, 1)
    assert mk.last_selected == [0, 1, 2, 3]
    # unweighted mean of a, b, c, d: w = (3/4, 3/4), b = 1/4
    np.testing.assert_allclose(out["w"], [0.75, 0.75])
    np.testing.assert_allclose(out["b"], [0.25])
    assert isinstance(make_strategy("krum", num_malicious=2), Krum)
    assert {"krum", "multikrum"} <= set(STRATEGIES)
    with pytest.raises(ValueError):
        make_strategy("multikrum", num_malicious=-1)


# --- poisoning simulation ------------------------------------------------------------------

SIZE, HONEST, ROUNDS = 32, 4, 3


def images(label: int, count: int, seed: int) -> np.ndarray:
    """The synthetic class pattern of tests/conftest.py, as uint8 arrays (no files)."""
    base = np.array([[200, 80, 80], [80, 200, 80], [80, 80, 200], [200, 200, 80]][label])
    out = []
    for i in range(count):
        rng = np.random.default_rng(seed + i)
        img = rng.normal(0, 20, (SIZE, SIZE, 3)) + base
        yy, _ = np.mgrid[:SIZE, :SIZE]
        img[(yy // (4 + 2 * label)) % 2 == 0] *= 0.7
        out.append(img.clip(0, 255).astype(np.uint8))
    return np.stack(out)


def dataset(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.concatenate([images(c, count, seed + 1000 * c) for c in range(4)])
    return x, np.repeat(np.arange(4), count)


def calibrated(model, g: dict[str, np.ndarray], data: list[tuple[np.ndarray, np.ndarray]],
               bn: set[str], robust: bool) -> dict[str, np.ndarray]:
    """The round loop's BatchNorm calibration step (services/aggregator/rounds.py), in
    process: every hospital measures the statistics of ``g`` on its images, the attacker
    sends poisoned ones, pooled as the strategy asks (median for the robust ones)."""
    from leukofed.train import recalibrate_batchnorm
    from leukofed.wire import set_model_weights, weights_from_model

    measured = []
    for h, (x, _) in enumerate(data):
        set_model_weights(model, g)
        recalibrate_batchnorm(model, x)
        stats = {n: v for n, v in weights_from_model(model).items() if n in bn}
        if h == HONEST:  # the attacker poisons its statistics as well: flipped means, 10x var
            stats = {n: (v * 10 if n.endswith("variance") else -v) for n, v in stats.items()}
        measured.append(stats)
    return {**g, **pool_batchnorm_stats(measured, [len(x) for x, _ in data], robust=robust)}


def poisoning_accuracies(strategies: list[str], scale: float = 100.0) -> dict[str, float]:
    """Test accuracy after ROUNDS rounds with HONEST honest hospitals and one attacker that
    sends global - scale * (its honest update - global)."""
    from leukofed.models import build_model
    from leukofed.train import Trainer, local_fit
    from leukofed.wire import batchnorm_stat_names, set_model_weights, weights_from_model

    # Synthetic classes differ by colour here, so the colour-blind default recipe (CellFocus,
    # stain augmentation) cannot learn them: this test is about aggregation, not shortcuts.
    model = build_model("compact_cnn", SIZE, seed=0, cell_focus=False)
    trainer = Trainer(model, learning_rate=3e-3, jit_compile=False)
    bn = batchnorm_stat_names(model)
    initial = weights_from_model(model)
    data = [dataset(4, 100 * (h + 1)) for h in range(HONEST + 1)]
    x_test, y_test = dataset(8, 50_000)
    out: dict[str, float] = {}
    for name in strategies:
        strategy = make_strategy(name, bn_stat_names=bn)
        kept_attacker = False
        g = {k: v.copy() for k, v in initial.items()}
        for rnd in range(1, ROUNDS + 1):
            results = []
            for h, (x, y) in enumerate(data):
                set_model_weights(model, g)
                local_fit(trainer, x, y, epochs=2, batch_size=8, learning_rate=3e-3,
                          seed=rnd * 10 + h, augmentation="basic")
                w = weights_from_model(model)
                if h == HONEST:  # the attacker: flipped and scaled, BN statistics left honest
                    w = {k: (g[k] - scale * (v - g[k])).astype(v.dtype)
                         if np.issubdtype(v.dtype, np.floating) and k not in bn else v
                         for k, v in w.items()}
                results.append(ClientResult(f"h{h}", w, len(x)))
            g = strategy.aggregate(g, results, rnd)
            kept_attacker |= HONEST in getattr(strategy, "last_selected", [])
            if not strategy.weights_are_client_average:
                g = calibrated(model, g, data, bn, strategy.robust)
        set_model_weights(model, g)
        probs = trainer.predict(x_test)
        out[name] = float((probs.argmax(axis=1) == y_test).mean())
        # Cross-entropy on the true class: a broken model is confidently wrong, whatever
        # share of the 32 test images its arbitrary argmax happens to land on.
        true = probs[np.arange(len(y_test)), y_test]
        out[f"{name}_loss"] = float(-np.log(np.clip(true, 1e-12, 1.0)).mean())
        out[f"{name}_kept_attacker"] = float(kept_attacker)
    return out


@pytest.mark.slow
def test_one_poisoning_hospital_breaks_fedavg_not_the_robust_strategies() -> None:
    clean = poisoning_accuracies(["fedavg"], scale=-1.0)["fedavg"]  # scale -1: all honest
    acc = poisoning_accuracies(["fedavg", "fedmedian", "fedtrimmedavg", "krum", "multikrum"])
    print(f"accuracy, no attacker: fedavg {clean}; with 1 of 5 hospitals poisoning: {acc}")
    assert clean >= 0.7
    # At 100x FedAvg's model is broken, but which of 4 classes its argmax lands on is luck:
    # accuracy measured 0.25 and, once in CI, 0.5. Its cross-entropy says it is broken
    # whatever the argmax: 20.7 measured (chance is ln 4 = 1.4), the robust ones under 0.01.
    assert acc["fedavg"] <= 0.5, acc
    assert acc["fedavg_loss"] >= 5.0, acc
    # Margins leave room for thread-order noise in TF on 2 cores, and for the augmentation's
    # random stream, which depends on what the suite ran before in the same process: the
    # robust ones measured loss 0.0001-0.001 alone and 0.58 (accuracy 0.75) once in the full
    # suite. Below chance (ln 4 = 1.39) is a working model; FedAvg's broken one is 18-21.
    for name in ("fedmedian", "fedtrimmedavg", "multikrum"):
        assert acc[name] >= 0.6, acc
        assert acc[f"{name}_loss"] <= 1.0, acc
    # Krum serves one honest hospital's model trained on 16 images: measured 0.5-1.0, so its
    # accuracy says little; what Krum promises is that the attacker is never the one kept.
    assert acc["krum"] > acc["fedavg"], acc
    assert acc["krum_kept_attacker"] == acc["multikrum_kept_attacker"] == 0.0, acc
