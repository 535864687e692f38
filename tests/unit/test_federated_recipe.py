"""The default federated recipe's two components, by their maths: the round-level cosine
learning rate and the logit-adjusted (balanced softmax) local loss."""

from __future__ import annotations

import math

import numpy as np
import pytest

from leukofed.strategies import round_learning_rate


def test_cosine_rounds_follow_the_centralized_epoch_schedule() -> None:
    from leukofed.train import cosine_lr

    rates = [round_learning_rate(1e-3, "cosine", r, 12) for r in range(1, 13)]
    assert rates == pytest.approx([cosine_lr(1e-3, e, 12) for e in range(12)])
    assert rates[0] == pytest.approx(5e-4)  # one warm-up round at half the rate
    assert rates[1] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(rates[1:], rates[2:]))  # then only down
    assert rates[-1] < 0.03 * 1e-3


def test_constant_schedule_and_edge_rounds() -> None:
    assert {round_learning_rate(2e-3, "constant", r, 5) for r in range(1, 6)} == {2e-3}
    assert round_learning_rate(1e-3, "cosine", 1, 1) == 1e-3  # one round: no warm-up
    # a round past the plan (a resumed run that was extended) keeps the last rate
    assert round_learning_rate(1e-3, "cosine", 20, 12) == round_learning_rate(1e-3, "cosine",
                                                                               12, 12)
    with pytest.raises(ValueError, match="schedule"):
        round_learning_rate(1e-3, "step", 1, 5)


def test_logit_prior_is_log_frequency_with_a_floor_for_absent_classes() -> None:
    from leukofed.train import logit_prior

    prior = logit_prior(np.array([0, 1, 1, 1]))
    assert prior == pytest.approx([math.log(0.25), math.log(0.75), math.log(1e-4),
                                   math.log(1e-4)], rel=1e-6)


def test_pooled_log_prior_sums_the_hospitals_counts_into_one_prior() -> None:
    """The federation's pooled prior (ablation la=3, fit(logit_adjustment=True)) is the
    prior of the union of the hospitals' labels, not the mean of their priors."""
    from leukofed.train import logit_prior, pooled_log_prior

    a, b = np.array([0, 0, 0, 1]), np.array([1, 1, 1, 1, 1, 1, 2, 3])
    counts = np.bincount(a, minlength=4) + np.bincount(b, minlength=4)
    assert pooled_log_prior(counts) == pytest.approx(logit_prior(np.concatenate([a, b])))
    assert pooled_log_prior(counts) == pytest.approx(np.log([3 / 12, 7 / 12, 1 / 12, 1 / 12]),
                                                     rel=1e-6)
    assert pooled_log_prior(np.zeros(4))[0] == pytest.approx(math.log(1e-4))


def _loss_and_grads(log_prior: np.ndarray, y: np.ndarray, logits: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The training loss (leukofed.train.adjusted_cross_entropy, as Trainer's step uses it)
    on probabilities softmax(logits): the per-example loss and its gradient in the logits."""
    import tensorflow as tf

    from leukofed.train import adjusted_cross_entropy

    x = tf.Variable(logits.astype(np.float32))
    with tf.GradientTape() as tape:
        loss = adjusted_cross_entropy(tf.nn.softmax(x), tf.constant(y), tf.constant(log_prior))
        total = tf.reduce_sum(loss)
    return loss.numpy(), tape.gradient(total, x).numpy()


def test_zero_prior_is_the_plain_cross_entropy() -> None:
    logits = np.array([[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, 0.4]])
    loss, _ = _loss_and_grads(np.zeros(4, np.float32), np.array([0, 3]), logits)
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert loss == pytest.approx(-np.log([p[0, 0], p[1, 3]]), rel=1e-5)


def test_logit_adjustment_spares_classes_a_hospital_does_not_have() -> None:
    """A hospital with only classes 0 and 1: the plain loss pushes the logits of classes 2
    and 3 down on every step (gradient = their probability); adjusted by its prior, they
    get almost none, so its update leaves what other hospitals taught about them alone."""
    from leukofed.train import logit_prior

    y = np.array([0, 1, 1, 1])
    logits = np.zeros((4, 4))  # an undecided model: every class at 0.25
    _, plain = _loss_and_grads(np.zeros(4, np.float32), y, logits)
    _, adjusted = _loss_and_grads(logit_prior(y), y, logits)
    assert plain[:, 2:] == pytest.approx(0.25, rel=1e-4)
    assert np.abs(adjusted[:, 2:]).max() < 1e-3
    # and the optimum is the balanced one: at the local prior's own odds the adjusted loss
    # gives class 0 and 1 logits no reason to move apart (the gradient between them is 0)
    balanced = np.zeros((4, 4))
    _, at_balance = _loss_and_grads(logit_prior(y), y, balanced)
    assert at_balance[:, :2].sum(axis=0) == pytest.approx([0.0, 0.0], abs=1e-3)
