"""Example-level differential privacy (leukofed.dp_sgd): clipping, noise scale, Poisson
sampling, the accountant against dp-accounting's documented values, the hospital's ledger.
Tiny models (16 px, no dropout) and a handful of images: seconds in all."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

from leukofed import dp_sgd
from leukofed.models import build_model
from leukofed.train import Trainer


@pytest.fixture(scope="module")
def trainer() -> Trainer:
    model = build_model("compact_cnn", 16, norm="group", cell_focus=False,
                        rotation_ensemble=False, dropout=0.0, seed=0)
    return Trainer(model)


def _images(n: int, seed: int = 0) -> tuple[tf.Tensor, tf.Tensor]:
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 255, (n, 16, 16, 3)).astype(np.float32)
    return tf.constant(x), tf.constant(np.arange(n) % 4, tf.int64)


# ---------------------------------------------------------------- clipping


def test_clipped_sum_bounds_each_example_and_keeps_small_ones() -> None:
    rng = np.random.default_rng(1)
    scales = np.array([0.01, 0.5, 3.0, 100.0], np.float32)  # two under, two over C=1
    per_example = [tf.constant(rng.normal(size=(4, 3, 5)).astype(np.float32)
                               * scales[:, None, None] / 4),
                   tf.constant(rng.normal(size=(4, 7)).astype(np.float32)
                               * scales[:, None] / 4)]
    summed, norms = dp_sgd.clipped_sum(per_example, 1.0)
    f = dp_sgd.clip_factors(norms, 1.0).numpy()
    clipped_norms = f * norms.numpy()
    assert np.all(clipped_norms <= 1.0 + 1e-5)
    small = norms.numpy() <= 1.0
    assert small.any() and (~small).any()
    np.testing.assert_allclose(f[small], 1.0)  # under the bound: unchanged
    np.testing.assert_allclose(clipped_norms[~small], 1.0, rtol=1e-5)  # over: exactly C
    expected = [np.tensordot(f, g.numpy(), axes=1) for g in per_example]
    for got, want in zip(summed, expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-7)


def test_per_example_gradients_are_each_images_own(trainer: Trainer) -> None:
    """The vectorised gradients equal a tape over a batch of that image alone."""
    from leukofed.train import adjusted_cross_entropy

    x, y = _images(3)
    grads, _, _ = dp_sgd.dp_step_for(trainer).per_example_grads(x, y)
    variables = trainer.model.trainable_variables
    for i in range(3):
        with tf.GradientTape() as tape:
            probs = trainer.model(x[i:i + 1], training=True)
            loss = adjusted_cross_entropy(probs, y[i:i + 1], trainer.log_prior)[0]
        own = tape.gradient(loss, variables)
        for g, o in zip(grads, own):
            np.testing.assert_allclose(g[i].numpy(), o.numpy(), rtol=1e-3, atol=1e-5)


def test_each_real_gradient_is_bounded_after_clipping(trainer: Trainer) -> None:
    x, y = _images(5, seed=2)
    grads, _, _ = dp_sgd.dp_step_for(trainer).per_example_grads(x * 10.0, y)
    c = 1e-3  # far under the real norms: every example is clipped
    _, norms = dp_sgd.clipped_sum(grads, c)
    assert np.all(norms.numpy() > c)
    for i in range(5):
        one, _ = dp_sgd.clipped_sum([g[i:i + 1] for g in grads], c)
        norm = math.sqrt(sum(float(tf.reduce_sum(tf.square(t))) for t in one))
        assert norm <= c * (1 + 1e-4)


def test_batchnorm_model_is_refused_with_the_reason() -> None:
    model = build_model("compact_cnn", 16, norm="batch", cell_focus=False,
                        rotation_ensemble=False)
    with pytest.raises(dp_sgd.BatchMixingModel, match="norm 'group'"):
        dp_sgd.check_model(model)


# ---------------------------------------------------------------- noise


def test_noise_scale_is_sigma_c_over_expected_batch() -> None:
    gen = tf.random.Generator.from_seed(3)
    summed = [tf.zeros([200_000])]
    sigma, c, expected = 1.7, 0.5, 8.0
    (out,) = dp_sgd.noised_mean(summed, c, sigma, expected, gen)
    std = float(tf.math.reduce_std(out))
    assert std == pytest.approx(sigma * c / expected, rel=0.01)
    assert abs(float(tf.reduce_mean(out))) < 5 * sigma * c / expected / math.sqrt(200_000)


def test_step_without_noise_moves_by_the_clipped_mean_only(trainer: Trainer) -> None:
    """sigma 0, plain SGD-like check: the update direction is the clipped sum / (q n)."""
    step = dp_sgd.dp_step_for(trainer)
    step.noise_multiplier.assign(0.0)
    step.clip_norm.assign(1.0)
    step.expected_batch.assign(4.0)
    summed = [tf.ones_like(v) for v in trainer.model.trainable_variables]
    grads = dp_sgd.noised_mean(summed, step.clip_norm, step.noise_multiplier,
                               step.expected_batch, step.noise)
    for g in grads:
        np.testing.assert_allclose(g.numpy(), 0.25)


def test_dp_local_fit_changes_weights_and_reports_steps(trainer: Trainer) -> None:
    x = np.random.default_rng(4).integers(0, 255, (8, 16, 16, 3), dtype=np.uint8)
    y = np.arange(8) % 4
    before = [v.numpy().copy() for v in trainer.model.trainable_variables]
    params = dp_sgd.DPSGDParams(clip_norm=1.0, noise_multiplier=1.0, sampling_rate=0.5,
                                steps=4)
    stats = dp_sgd.dp_local_fit(trainer, x, y, params, augmentation="basic",
                                rng=np.random.default_rng(0))
    assert stats["steps"] == 4
    # Poisson batches of varying sizes share one trace of the per-example step.
    assert dp_sgd.dp_step_for(trainer).per_example_grads.experimental_get_tracing_count() == 1
    assert any(not np.allclose(b, v.numpy())
               for b, v in zip(before, trainer.model.trainable_variables))


# ---------------------------------------------------------------- sampling


def test_poisson_batch_takes_each_image_independently_at_rate_q() -> None:
    rng = np.random.default_rng(5)
    n, q, trials = 200, 0.1, 2000
    counts = np.zeros(n)
    sizes = []
    for _ in range(trials):
        idx = dp_sgd.poisson_batch(n, q, rng)
        assert len(np.unique(idx)) == len(idx)  # without replacement
        counts[idx] += 1
        sizes.append(len(idx))
    sizes = np.array(sizes)
    # Binomial(n, q) sizes: mean nq, variance nq(1-q); sizes vary (not a fixed batch).
    assert sizes.mean() == pytest.approx(n * q, abs=4 * math.sqrt(n * q * (1 - q) / trials))
    assert sizes.var() == pytest.approx(n * q * (1 - q), rel=0.15)
    # every image's inclusion frequency is q
    assert np.abs(counts / trials - q).max() < 5 * math.sqrt(q * (1 - q) / trials)
    assert len(dp_sgd.poisson_batch(3, 0.01, np.random.default_rng(0))) == 0  # may be empty


def test_sampling_plan() -> None:
    assert dp_sgd.sampling_plan(1000, 32, 2) == (0.032, 62)
    assert dp_sgd.sampling_plan(10, 32, 3) == (1.0, 3)
    with pytest.raises(ValueError):
        dp_sgd.sampling_plan(0, 32, 1)


# ---------------------------------------------------------------- accountant


def test_accountant_matches_dp_accounting_documented_value() -> None:
    """dp-accounting's own test (rdp_privacy_accountant_test.py,
    test_compute_epsilon_delta_gaussian): noise multiplier 4.530877117, no sampling, one
    step is exactly (1, 1e-6)-DP."""
    assert dp_sgd.epsilon_of([(4.530877117, 1.0, 1)], 1e-6) == pytest.approx(1.0, abs=1e-4)


def test_accountant_composes_steps_and_rounds() -> None:
    # RDP of the Gaussian is alpha / (2 sigma^2): k steps at sigma are one at sigma/sqrt(k).
    assert dp_sgd.epsilon_of([(2.0, 1.0, 4)], 1e-5) == pytest.approx(
        dp_sgd.epsilon_of([(1.0, 1.0, 1)], 1e-5), rel=1e-9)
    one_round = (1.1, 0.05, 40)
    e1 = dp_sgd.epsilon_of([one_round], 1e-5)
    e3 = dp_sgd.epsilon_of([one_round] * 3, 1e-5)
    assert e3 == pytest.approx(dp_sgd.epsilon_of([(1.1, 0.05, 120)], 1e-5), rel=1e-9)
    assert e1 < e3 < 3 * e1  # RDP composition beats adding epsilons
    assert dp_sgd.epsilon_of([(1.1, 0.05, 40)], 1e-5) < dp_sgd.epsilon_of([(1.1, 1.0, 40)],
                                                                           1e-5)
    assert dp_sgd.epsilon_of([], 1e-5) == 0.0
    assert dp_sgd.epsilon_of([(0.0, 0.5, 1)], 1e-5) == math.inf


def test_calibrated_noise_spends_the_target() -> None:
    sigma = dp_sgd.calibrate_noise(4.0, 1e-5, 0.1, 50)
    assert dp_sgd.epsilon_of([(sigma, 0.1, 50)], 1e-5) <= 4.0
    assert dp_sgd.epsilon_of([(sigma * 0.98, 0.1, 50)], 1e-5) > 4.0 * 0.99


# ---------------------------------------------------------------- the hospital's ledger


def test_ledger_is_durable_and_composes_per_run_and_in_total(tmp_path) -> None:
    ledger = dp_sgd.HospitalLedger(tmp_path)
    ledger.record(dp_sgd.LedgerEntry("r1", 1, 1.2, 0.1, 20, 1.0))
    ledger.record(dp_sgd.LedgerEntry("r2", 1, 1.2, 0.1, 20, 1.0))
    again = dp_sgd.HospitalLedger(tmp_path)  # a restarted worker reads the same spending
    assert len(again.entries()) == 2
    per_run = again.epsilon(1e-5, run="r1")
    assert per_run == pytest.approx(dp_sgd.epsilon_of([(1.2, 0.1, 20)], 1e-5))
    assert again.epsilon(1e-5) == pytest.approx(dp_sgd.epsilon_of([(1.2, 0.1, 40)], 1e-5))
    assert again.epsilon(1e-5, run="r1", extra=(1.2, 0.1, 20)) == pytest.approx(
        again.epsilon(1e-5))
    assert again.noise_for_run("r2") == 1.2 and again.noise_for_run("r3") is None


def test_group_privacy_for_a_patient_with_several_images() -> None:
    assert dp_sgd.group_privacy(1.0, 1e-5, 1) == (1.0, 1e-5)
    eps, delta = dp_sgd.group_privacy(1.0, 1e-5, 3)
    assert eps == 3.0 and delta == pytest.approx(3 * math.exp(2) * 1e-5)
    assert dp_sgd.group_privacy(5.0, 1e-5, 10)[1] == 1.0  # meaningless: capped at 1
