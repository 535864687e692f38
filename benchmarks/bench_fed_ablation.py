"""Where the federation loses points: federated recipes beside centralized training on the
same images for the same passes, in one process (no broker, no MLflow: the maths only).

Each scenario partitions the block split's train+val images into hospitals exactly as
``leukofed data partition`` does, and each hospital keeps its own 70/15/15 block split as
the client service does (services/client/hospital.py), so it trains on its ``train`` part
only. The centralized reference trains on the union of those same training images (each
under its hospital's simulated laboratory when ``labs``), for rounds x local epochs
epochs, with the centralized schedule (cosine, class-balanced loss). A federated variant
runs the client's own ``local_fit`` at each hospital in turn and the aggregator's strategy
(leukofed.strategies) on the answers; the served model is the last round's.

Every final model gets its companions: the colour-histogram forest on the same split, the
recoloured accuracy and the share of answers following the colour (leukofed.audit), and
accuracy on a simulated laboratory no hospital has.

    .venv/bin/python benchmarks/bench_fed_ablation.py --scenarios 3,10 \
        --variants "constant:schedule=constant:la=0,default:schedule=cosine:la=1"

Writes benchmarks/results/federated-ablation.json and docs/benchmarks-federated-ablation.md
(``--append`` adds rows to an earlier run's file). Never run two of these at once here.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import carry_earlier, header, write_json

from leukofed.strategies import Strategy, weighted_average  # NumPy only, no TensorFlow

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("Benign", "Early", "Pre", "Pro")
DEFAULT_VARIANT = {"schedule": "cosine", "la": 1, "epochs": 2, "strategy": "fedavg",
                   "server_lr": 1.0, "momentum": 0.9, "bn": "average", "lr": 0.0,
                   "bncal": -1, "batch": 0, "norm": "batch",
                   "gw": 0, "rounds": 0, "mode": "federated",
                   "bnfix": 0, "head": 0, "bs": 0, "scaffold": 0, "fixhead": 0, "sbank": 0,
                   "eps": 0.0, "lamix": 0.0}


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``name:key=value:...`` over DEFAULT_VARIANT (schedule constant|cosine, la 0|1,
    epochs N, strategy NAME, server_lr X and momentum M for fedavgm, bn average|local,
    lr X: the hospitals' base learning rate, 0 for --learning-rate; bncal 1|0: BatchNorm
    statistics measured on the new global weights and pooled, -1: as the aggregator's
    "auto" does, for every strategy but FedAvg/FedProx; batch N: the hospitals' batch size,
    0 for --batch-size; norm batch|group: the compact CNN's normalisation; gw 1: class
    weights from the pooled counts at every hospital instead of its own; rounds N: this
    variant's rounds, 0 for --rounds: with epochs, the same passes in more, shorter rounds;
    mode central: the centralized reference trained with this variant's norm (and
    passes), with la 2 on the pooled class prior (logit adjustment) instead of class
    weights (in a federated variant, la 3: every hospital's logit adjustment uses the
    pooled prior instead of its own); mode hospital_batches: no federation, centralized
    training whose every batch comes from one hospital, which separates label-skewed
    batches from model averaging; mode hospital_sum: no federation, each optimizer step the
    sum of one batch's gradient from every hospital (weighted by its share of the images),
    each forward pass (so its BatchNorm statistics) on one hospital's batch: what a
    one-hospital forward pass costs apart from what a one-hospital step costs (its
    reference: mode central with batch = hospitals x batch, the same images a step); bnfix R:
    from round R on, hospitals train with BatchNorm in inference mode, normalising by the
    statistics pooled over every hospital on the round's global weights instead of by their
    batch's own, which depend on its label mix (FixBN, Zhong et al. 2023: R past the early
    rounds, when the statistics have settled); head 1: after each round the classifier head
    is refitted on virtual features drawn from the hospitals' pooled per-class feature statistics
    (leukofed.head_rebalance) and sent on in the global weights, head 2: refitted for the
    evaluated model only, the next round starts from the averaged head; bs 1: each
    hospital draws its round's images class-balanced (with replacement, every class it holds
    eight or more images of equally often, rarer ones as they are), so its batches mix
    classes as a pooled shuffle would); scaffold 1: SCAFFOLD's control variates (Karimireddy
    et al. 2020): every local gradient is corrected by (global mean gradient - this
    hospital's mean gradient), both from the previous round's local steps, so a step on one
    hospital's batch follows the federation's gradient instead of its own label mix and
    laboratory); fixhead 1: the classifier head stays at its random initialisation and only
    the features train (FedBABU, Oh et al. 2022: a head no hospital can bias towards its
    own label mix), fixhead 2: the head fixed at a simplex equiangular tight frame (FedETF,
    Li et al. 2023: every pair of classes equally far apart), zero bias; sbank 1: the
    stain-transfer augmentation draws its targets from the federation's pooled per-class
    stain statistics (leukofed.stain_bank) instead of the hospital's own batch (also in mode
    hospital_batches); eps X: the hospitals' Adam epsilon (0: Keras' 1e-7): Adam divides by
    the gradient's own scale, so a hospital whose logit-adjusted loss is already near zero
    (one class held) still takes full-sized steps in whatever direction its tiny gradient
    points, and a larger epsilon makes tiny gradients take tiny steps; lamix M: each
    hospital's logit-adjustment prior is (1 - M) x its own class frequencies + M x the
    federation's pooled ones, so a hospital holding one class still learns from it (M 0 is
    the default, M 1 is la 3)."""
    name, *pairs = text.split(":")
    out = dict(DEFAULT_VARIANT)
    for pair in pairs:
        key, value = pair.split("=", 1)
        if key not in out:
            raise SystemExit(f"unknown variant key {key!r} in {text!r}")
        out[key] = type(out[key])(value) if not isinstance(out[key], str) else value
    return name, out


def load_scenario(args: Any, n: int, scheme: str, labs: dict[str, Any] | None = None
                  ) -> dict[str, Any]:
    """The block split, its train+val partitioned into ``n`` hospitals and each hospital's
    training images (under its laboratory: ``labs``, default one drawn per hospital with
    ``--labs``), the pooled training images, the test images and, with laboratories, the test
    images under a laboratory no hospital has."""
    from leukofed.data import scan_dataset
    from leukofed.labs import draw_labs, unseen_lab
    from leukofed.partition import partition_records
    from leukofed.splits import group_split
    from leukofed.train import load_arrays

    dataset = scan_dataset(args.data)
    split = group_split(dataset.records, seed=args.seed)
    parts = partition_records(split.train + split.val, n, scheme, args.alpha, seed=args.seed)
    if labs is None:
        labs = draw_labs(n, args.seed) if args.labs else {}
    hospitals = {}
    for h, records in parts.items():
        local = group_split(records, 0.15, 0.15, 0)  # the client's own split (split_seed 0)
        hospitals[h] = load_arrays(local.train, args.image_size, acquisition=labs.get(h))
    test = load_arrays(split.test, args.image_size)
    unseen = load_arrays(split.test, args.image_size, acquisition=unseen_lab(args.seed)) \
        if args.labs else None
    pooled = (np.concatenate([x for x, _ in hospitals.values()]),
              np.concatenate([y for _, y in hospitals.values()]))
    return {"split": split, "hospitals": hospitals, "pooled": pooled, "test": test,
            "unseen": unseen}


def pooled_profile(images: list[np.ndarray]) -> Any:
    """The acquisition profile (leukofed.ood) of these hospitals' training images, pooled
    from each hospital's sufficient statistics as the aggregator pools them."""
    from leukofed.ood import AcquisitionProfile, ProfileStats

    stats = [ProfileStats.of_images(x) for x in images]
    pooled = stats[0]
    for st in stats[1:]:
        pooled = pooled.merge(st)
    return AcquisitionProfile.from_stats(pooled)


def referred_test_share(data: dict[str, Any]) -> float:
    """Share of the test images that a model trained on these hospitals refers. It depends
    on the images, not on the model or the recipe."""
    from common import referred_share

    return referred_share(pooled_profile([x for x, _ in data["hospitals"].values()]),
                          data["test"][0])


def wrong_by_block(trainer: Any, data: dict[str, Any]) -> dict[str, int]:
    """Misclassified test images per block of file numbers (leukofed.data groups: often one
    patient): neighbouring images share their smear, so a gap of a few points can be one
    block the model gets wrong rather than errors spread over many patients."""
    x, y = data["test"]
    wrong = np.argmax(trainer.predict(x), axis=1) != y
    out: dict[str, int] = {}
    for record, bad in zip(data["split"].test, wrong, strict=True):
        if bad:
            out[record.group] = out.get(record.group, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def final_report(trainer: Any, data: dict[str, Any], seed: int) -> dict[str, Any]:
    from leukofed.audit import audit_set_from_train, run_audit
    from leukofed.train import evaluate

    m = evaluate(trainer, *data["test"])
    out = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
           "recall": {c: m["per_class"][c]["recall"] for c in CLASSES},
           "wrong_by_block": wrong_by_block(trainer, data)}
    out["audit"] = run_audit(trainer.predict, audit_set_from_train(*data["pooled"], *data["test"],
                                                                   len(CLASSES), seed))
    if data["unseen"] is not None:
        out["unseen_lab_accuracy"] = evaluate(trainer, *data["unseen"])["accuracy"]
    return out


def central(args: Any, data: dict[str, Any], epochs: int, norm: str = "batch",
            logit_adjustment: bool = False, batch: int = 0) -> dict[str, Any]:
    from leukofed.models import build_model
    from leukofed.train import Trainer, evaluate, fit

    x, y = data["pooled"]
    trainer = Trainer(build_model("compact_cnn", args.image_size, seed=args.seed, norm=norm))
    curve: list[float] = []
    start = time.perf_counter()
    fit(trainer, (x, y), None, epochs, batch or args.batch_size, args.learning_rate,
        patience=epochs + 1, seed=args.seed, progress=False, logit_adjustment=logit_adjustment,
        on_epoch=lambda row: curve.append(evaluate(trainer, *data["test"])["accuracy"]))
    out = final_report(trainer, data, args.seed)
    out.update(curve=curve, seconds=time.perf_counter() - start, images=int(len(y)))
    print(f"  central {epochs} epochs: {out['accuracy']:.4f}", flush=True)
    return out


def central_hospital_batches(args: Any, data: dict[str, Any], v: dict[str, Any]
                             ) -> dict[str, Any]:
    """One model, one optimizer, the centralized schedule and class weights, but each batch
    drawn from a single hospital (hospitals in random order, in proportion to their
    batches): the label-skewed batches of federated training without the averaging."""
    from leukofed.models import build_model
    from leukofed.train import (
        Trainer,
        class_weights,
        cosine_lr,
        evaluate,
        make_dataset,
        recalibrate_batchnorm,
    )

    trainer = Trainer(build_model("compact_cnn", args.image_size, seed=args.seed,
                                  norm=v["norm"]))
    x_all, y_all = data["pooled"]
    trainer.reset(class_weights=class_weights(y_all))
    bank = stain_bank_for(data, v, args.seed)
    sets = {h: make_dataset(x, y, args.batch_size, training=True, seed=args.seed,
                            stain_bank=bank)
            for h, (x, y) in data["hospitals"].items()}
    batches = {h: max(1, len(y) // args.batch_size) for h, (_, y) in data["hospitals"].items()}
    rng = np.random.default_rng(args.seed)
    epochs = v["epochs"] * (v["rounds"] or args.rounds)
    start = time.perf_counter()
    for epoch in range(epochs):
        trainer.learning_rate = cosine_lr(args.learning_rate, epoch, epochs)
        streams = {h: iter(ds) for h, ds in sets.items()}
        order = [h for h, n in batches.items() for _ in range(n)]
        for h in rng.permutation(order):
            trainer._train_step(*next(streams[h]))
        recalibrate_batchnorm(trainer.model, x_all)
        print(f"  epoch {epoch + 1}/{epochs} test acc "
              f"{evaluate(trainer, *data['test'])['accuracy']:.4f}", flush=True)
    out = final_report(trainer, data, args.seed)
    out.update(curve=[], seconds=time.perf_counter() - start)
    return out


def central_hospital_sum(args: Any, data: dict[str, Any], v: dict[str, Any]) -> dict[str, Any]:
    """Centralized training whose every step adds one batch's gradient from each hospital,
    weighted by the hospital's share of the images (the pooled class-weighted loss), each
    forward pass on one hospital's batch: the steps of pooled training, the BatchNorm batch
    statistics (and stain transfers) of federated training."""
    import tensorflow as tf

    from leukofed.models import build_model
    from leukofed.train import (
        Trainer,
        class_weights,
        cosine_lr,
        evaluate,
        make_dataset,
        recalibrate_batchnorm,
    )

    model = build_model("compact_cnn", args.image_size, seed=args.seed, norm=v["norm"])
    trainer = Trainer(model)
    x_all, y_all = data["pooled"]
    trainer.reset(class_weights=class_weights(y_all))
    variables = model.trainable_variables
    share = {h: len(y) / len(y_all) for h, (_, y) in data["hospitals"].items()}

    @tf.function
    def gradients(x: Any, y: Any) -> Any:
        with tf.GradientTape() as tape:
            loss, _ = trainer.loss(x, y)
        return tape.gradient(loss, variables)

    streams = {h: iter(make_dataset(x, y, args.batch_size, training=True,
                                    seed=args.seed).repeat())
               for h, (x, y) in data["hospitals"].items()}
    epochs = v["epochs"] * (v["rounds"] or args.rounds)
    steps = len(y_all) // (args.batch_size * len(streams))
    start = time.perf_counter()
    for epoch in range(epochs):
        trainer.learning_rate = cosine_lr(args.learning_rate, epoch, epochs)
        for _ in range(steps):
            total = None
            for h, stream in streams.items():
                g = [share[h] * t for t in gradients(*next(stream))]
                total = g if total is None else [a + b for a, b in zip(total, g, strict=True)]
            trainer.optimizer.apply_gradients(zip(total, variables, strict=True))
        recalibrate_batchnorm(model, x_all)
        print(f"  epoch {epoch + 1}/{epochs} test acc "
              f"{evaluate(trainer, *data['test'])['accuracy']:.4f}", flush=True)
    out = final_report(trainer, data, args.seed)
    out.update(curve=[], seconds=time.perf_counter() - start)
    return out


def prior_counts(v: dict[str, Any], y: np.ndarray, pooled_freq: np.ndarray
                 ) -> np.ndarray | None:
    """What local_fit's logit adjustment reads as class counts (None: the hospital's own):
    the pooled frequencies (la 3), or its own mixed with them (lamix M)."""
    if v["la"] == 3:
        return pooled_freq
    if v["lamix"]:
        own = np.bincount(y, minlength=len(CLASSES)) / len(y)
        return (1 - v["lamix"]) * own + v["lamix"] * pooled_freq
    return None


def federated(args: Any, data: dict[str, Any], v: dict[str, Any],
              joins: dict[str, int] | None = None,
              after_round: Any = None) -> dict[str, Any]:
    """FedAvg-family rounds over ``data["hospitals"]``; a hospital in ``joins`` takes part
    from that round on; ``after_round(round, trainer)`` sees each new global model."""
    from leukofed.models import batchnorm_layers, build_model
    from leukofed.strategies import ClientResult, make_strategy, round_learning_rate
    from leukofed.train import (
        Trainer,
        class_weights,
        evaluate,
        local_fit,
        recalibrate_batchnorm,
    )
    from leukofed.wire import batchnorm_stat_names, set_model_weights, weights_from_model

    model = build_model("compact_cnn", args.image_size, seed=args.seed, norm=v["norm"])
    if v["fixhead"]:
        fix_head(model, etf=v["fixhead"] == 2, seed=args.seed)
    bn_layers = batchnorm_layers(model)
    x_pool, y_pool = data["pooled"]

    def pooled_bn(frozen: bool = False) -> None:
        for la in bn_layers:  # measured in training mode, then frozen again
            la.trainable = True
        recalibrate_batchnorm(model, x_pool)
        for la in bn_layers:
            la.trainable = not frozen

    trainer = ScaffoldTrainer(model) if v["scaffold"] else Trainer(model)
    if v["eps"]:
        trainer.optimizer.epsilon = v["eps"]  # read when the train step is traced
    pooled_freq = np.bincount(y_pool, minlength=len(CLASSES)) / len(y_pool)
    control: dict[str, list[np.ndarray]] = {}  # SCAFFOLD: each hospital's mean gradient
    params = {"server_lr": v["server_lr"], "momentum": v["momentum"]} \
        if v["strategy"] == "fedavgm" else {}
    if v["strategy"] == "fedexp":
        strategy = FedExP(bn_mode=v["bn"], bn_stat_names=batchnorm_stat_names(model))
    else:
        strategy = make_strategy(v["strategy"], bn_mode=v["bn"],
                                 bn_stat_names=batchnorm_stat_names(model), **params)
    global_w = weights_from_model(model)
    curve = []
    pooled = class_weights(y_pool) if v["gw"] else None
    start = time.perf_counter()
    rounds = v["rounds"] or args.rounds
    for rnd in range(1, rounds + 1):
        lr = round_learning_rate(v["lr"] or args.learning_rate, v["schedule"], rnd, rounds)
        frozen = bool(v["bnfix"]) and rnd >= v["bnfix"]
        if frozen and rnd == v["bnfix"]:
            # Keras runs a non-trainable BatchNormalization in inference mode; the train
            # step is traced anew for it.
            set_model_weights(model, global_w)
            pooled_bn(frozen=True)
            global_w = weights_from_model(model)
            trainer = Trainer(model)
        results = []
        for i, (h, (x, y)) in enumerate(data["hospitals"].items()):
            if rnd < (joins or {}).get(h, 1):
                continue
            set_model_weights(model, global_w)
            if v["bs"]:
                idx = balanced_indices(y, np.random.default_rng([args.seed, rnd, i]))
                x, y = x[idx], y[idx]
            if v["scaffold"]:
                trainer.start_round(scaffold_correction(control, h, data["hospitals"]))
            local_fit(trainer, x, y, epochs=v["epochs"], batch_size=v["batch"] or args.batch_size,
                      learning_rate=lr, seed=args.seed * 1_000_003 + rnd * 101 + i,
                      logit_adjustment=bool(v["la"]), pooled_class_weights=pooled,
                      pooled_class_counts=prior_counts(v, y, pooled_freq),
                      stain_bank=stain_bank_for(data, v, args.seed * 7 + rnd))
            if v["scaffold"]:
                control[h] = trainer.mean_gradient()
            results.append(ClientResult(h, weights_from_model(model), int(len(x))))
        global_w = strategy.aggregate(global_w, results, rnd)
        set_model_weights(model, global_w)
        if v["bncal"] == 1 or frozen or (v["bncal"] == -1
                                         and not strategy.weights_are_client_average):
            # The aggregator's BatchNorm calibration ("bn_calibration" auto): statistics
            # measured on the new weights, pooled over the hospitals' training images.
            pooled_bn(frozen)
            global_w = weights_from_model(model)
        if v["head"]:
            head = rebalanced_head(model, data["hospitals"], args.seed * 7919 + rnd)
            set_model_weights(model, {**global_w, **head})
            if v["head"] == 1:
                global_w = {**global_w, **head}
        m = evaluate(trainer, *data["test"])
        curve.append({"round": rnd, "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
                      "benign_recall": m["per_class"]["Benign"]["recall"], "lr": lr})
        print(f"  round {rnd:>2}/{rounds} lr {lr:.2e} test acc {m['accuracy']:.4f} "
              f"Benign recall {curve[-1]['benign_recall']:.3f}", flush=True)
        if after_round is not None:
            after_round(rnd, trainer)
    out = final_report(trainer, data, args.seed)
    out.update(curve=curve, seconds=time.perf_counter() - start)
    return out


def stain_bank_for(data: dict[str, Any], v: dict[str, Any], seed: int) -> np.ndarray | None:
    """With ``sbank``: stain targets drawn from every hospital's per-class stain moments,
    pooled (what the aggregator would send each round); else None."""
    if not v["sbank"]:
        return None
    from leukofed.stain_bank import class_stain_moments, draw_stain_bank

    if "stain_moments" not in data:
        data["stain_moments"] = [class_stain_moments(x, y, len(CLASSES))
                                 for x, y in data["hospitals"].values()]
    return draw_stain_bank(data["stain_moments"], seed=seed)


def fix_head(model: Any, etf: bool, seed: int) -> None:
    """Freeze the softmax head (before the Trainer is built, so the optimizer never sees
    it); with ``etf`` first set it to a simplex equiangular tight frame, scaled so that a
    unit-norm feature on a class direction gives that class logit 4 above the others."""
    head = model.get_layer("probabilities")
    if etf:
        kernel, bias = head.get_weights()
        d, k = kernel.shape
        u, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, k)))
        frame = u @ (np.eye(k) - np.ones((k, k)) / k) * np.sqrt(k / (k - 1))
        head.set_weights([(4.0 * frame).astype(np.float32), np.zeros_like(bias)])
    head.trainable = False


def fedexp_step(deltas: list[dict[str, np.ndarray]], weights: list[float],
                eps: float = 1e-3) -> float:
    """FedExP's server step size (Jhunjhunwala et al. 2023): the weighted mean of the
    hospitals' squared update norms over twice the squared norm of their weighted mean
    update, at least 1. Updates that disagree (heterogeneous hospitals) cancel in the mean,
    so the mean moves less than any hospital did: the step extrapolates it back."""
    w = np.asarray(weights, np.float64) / float(np.sum(weights))
    mean_sq = sum(wi * sum(float(np.sum(d * d)) for d in delta.values())
                  for wi, delta in zip(w, deltas, strict=True))
    avg = {n: sum(wi * delta[n] for wi, delta in zip(w, deltas, strict=True))
           for n in deltas[0]}
    avg_sq = sum(float(np.sum(a * a)) for a in avg.values())
    return max(1.0, mean_sq / (2.0 * (avg_sq + eps)))


class FedExP(Strategy):
    """FedAvg whose averaged update is scaled by ``fedexp_step`` (float weights; the
    BatchNorm statistics are averaged, then recalibrated: the weights are no client's
    average)."""

    name = "fedexp"

    def _combine(self, global_weights: Any, updates: list[dict[str, np.ndarray]],
                 num_examples: list[float]) -> Any:
        if not global_weights:
            return {}
        deltas = [{n: np.asarray(u[n], np.float64) - x for n, x in global_weights.items()}
                  for u in updates]
        eta = fedexp_step(deltas, num_examples)
        print(f"  fedexp server step {eta:.2f}", flush=True)
        avg = weighted_average(updates, num_examples)
        return {n: x + eta * (np.asarray(avg[n], np.float64) - x)
                for n, x in global_weights.items()}


def scaffold_correction(control: dict[str, list[np.ndarray]], hospital: str,
                        hospitals: dict[str, Any]) -> list[np.ndarray] | None:
    """SCAFFOLD's correction for ``hospital``: the federation's mean gradient (hospitals
    weighted by their images, as FedAvg weighs their updates) minus its own, both as
    measured over the last round's local steps; None before every hospital has one."""
    if hospital not in control or len(control) < len(hospitals):
        return None
    n = {h: len(hospitals[h][1]) for h in control}
    total = sum(n.values())
    mean = [sum(n[h] * control[h][k] for h in control) / total
            for k in range(len(control[hospital]))]
    return [m - c for m, c in zip(mean, control[hospital])]


def ScaffoldTrainer(model: Any) -> Any:  # noqa: N802 - a factory: TensorFlow loads lazily
    """A Trainer whose step adds a fixed correction to every gradient and keeps the mean of
    the uncorrected ones (SCAFFOLD option I along the local trajectory)."""
    import tensorflow as tf

    from leukofed.train import Trainer

    class _Scaffold(Trainer):
        def __init__(self, model: Any) -> None:
            super().__init__(model)
            vs = model.trainable_variables
            self.correction = [tf.Variable(tf.zeros_like(v), trainable=False) for v in vs]
            self.grad_sum = [tf.Variable(tf.zeros_like(v), trainable=False) for v in vs]
            self.steps = tf.Variable(0.0, trainable=False)

        def start_round(self, correction: list[np.ndarray] | None) -> None:
            for c, g in zip(self.correction, self.grad_sum):
                c.assign(tf.zeros_like(c))
                g.assign(tf.zeros_like(g))
            if correction is not None:
                for c, value in zip(self.correction, correction):
                    c.assign(value)
            self.steps.assign(0.0)

        def mean_gradient(self) -> list[np.ndarray]:
            n = max(float(self.steps.numpy()), 1.0)
            return [g.numpy() / n for g in self.grad_sum]

        def _apply_gradients(self, grads: Any, variables: Any) -> None:
            for g, s in zip(grads, self.grad_sum):
                s.assign_add(g)
            self.steps.assign_add(1.0)
            self.optimizer.apply_gradients(
                [(g + c, v) for g, c, v in zip(grads, self.correction, variables)])

    return _Scaffold(model)


def rebalanced_head(model: Any, hospitals: dict[str, Any], seed: int) -> dict[str, Any]:
    """The head refitted on the pooled per-class feature statistics of every hospital's
    training images under the current model (what each hospital would send)."""
    from leukofed import head_rebalance
    from leukofed.train import head_features
    from leukofed.wire import weights_from_model

    stats = [head_rebalance.class_feature_stats(*head_features(model, x, y), len(CLASSES))
             for x, y in hospitals.values()]
    return head_rebalance.rebalanced_head(weights_from_model(model), stats, seed)


def balanced_indices(y: np.ndarray, rng: np.random.Generator, min_images: int = 8
                     ) -> np.ndarray:
    """``len(y)`` indices, shuffled: every class with at least ``min_images`` images drawn
    equally often (with replacement), the rarer classes' images once each (repeating two
    images forty times teaches those two images)."""
    classes = np.unique(y)
    common = [c for c in classes if (y == c).sum() >= min_images]
    rare = np.flatnonzero(np.isin(y, [c for c in classes if c not in common]))
    per_class = (len(y) - len(rare)) // max(len(common), 1)
    drawn = [rng.choice(np.flatnonzero(y == c), per_class, replace=True) for c in common]
    return rng.permutation(np.concatenate([rare, *drawn]).astype(np.int64))


def local_steps(train_images: dict[str, int], epochs: int, batch: int) -> float:
    """Optimizer steps a hospital makes in a round, on average over hospitals (make_dataset
    drops the last partial batch; a hospital smaller than a batch makes one step)."""
    return float(np.mean([epochs * max(1, n // batch) for n in train_images.values()]))


def join_scenario(args: Any) -> dict[str, Any]:
    """``--join N``: N hospitals, each its own laboratory, train from round 1; hospital N+1,
    from a laboratory outside the training range (leukofed.labs "outside"), joins at round
    ``--join-round``. Its test images (the server test split under its laboratory) are
    judged before it joins and at the end: the share the model refers (the acquisition
    profile pooled from the participating hospitals' training images, leukofed.ood) and the
    accuracy, beside the same test images under each training laboratory."""
    from common import referred_share

    from leukofed.labs import draw_acquisition, draw_labs
    from leukofed.partition import hospital_ids
    from leukofed.train import evaluate, load_arrays

    n = args.join
    args.labs = True
    ids = hospital_ids(n + 1)
    joiner = ids[-1]
    lab = draw_acquisition(np.random.default_rng([args.seed, 3]), "outside", name="joining")
    labs = {**draw_labs(n + 1, args.seed), joiner: lab}
    data = load_scenario(args, n + 1, "dirichlet", labs)
    test = data["split"].test
    joining_test = load_arrays(test, args.image_size, acquisition=lab)
    lab_tests = {h: load_arrays(test, args.image_size, acquisition=labs[h]) for h in ids[:-1]}
    out: dict[str, Any] = {"hospitals": n, "joining_hospital": joiner,
                           "joining_lab": lab.to_dict(), "join_round": args.join_round,
                           "rounds": args.rounds,
                           "rounds_after_join": args.rounds - args.join_round + 1}

    def judge(when: str, hospitals: list[str], trainer: Any) -> None:
        profile = pooled_profile([data["hospitals"][h][0] for h in hospitals])
        out[f"joining_lab_referred_{when}"] = referred_share(profile, joining_test[0])
        out[f"joining_lab_accuracy_{when}"] = evaluate(trainer, *joining_test)["accuracy"]
        print(f"  {when} joining: referred {out[f'joining_lab_referred_{when}']:.3f}, "
              f"accuracy {out[f'joining_lab_accuracy_{when}']:.4f}", flush=True)
        if when == "after":
            others = {h: evaluate(trainer, *t)["accuracy"] for h, t in lab_tests.items()}
            out["other_labs"] = others
            out["other_labs_accuracy"] = float(np.mean(list(others.values())))
            out["other_labs_referred"] = float(np.mean([referred_share(profile, t[0])
                                                        for t in lab_tests.values()]))

    def after_round(rnd: int, trainer: Any) -> None:
        if rnd == args.join_round - 1:
            judge("before", ids[:-1], trainer)
        if rnd == args.rounds:
            judge("after", ids, trainer)

    fed = federated(args, data, dict(DEFAULT_VARIANT), {joiner: args.join_round}, after_round)
    out["test_accuracy"] = fed["accuracy"]
    return out


def scenario_key(s: dict[str, Any]) -> tuple[int, str, bool, int]:
    return (s["hospitals"], s["partition"], s["labs"], s["rounds"])


def markdown(doc: dict[str, Any]) -> str:
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [
        "# Where the federation loses points (ablation, in-process)", "",
        f"Generated by `{doc['command']}` on {doc['date']} "
        f"({doc['machine']['cpu']}, {doc['machine']['cores']} cores). Same block split, "
        "each hospital's own 70/15/15 split as the client makes it, the centralized reference "
        "on the union of the hospitals' training images (under their laboratories), same "
        "passes. *colour forest*: a random forest on colour histograms, same split; "
        "*recoloured*: test images recoloured to another class's stain (share of answers "
        "following the colour); *unseen lab*: the test images under a laboratory no "
        "hospital has; *test referred*: the share of test images the served model would refer "
        "(the acquisition profile pooled from the hospitals' training images: the same for "
        "every row of a scenario).", "",
        "| hospitals | partition | variant | rounds x epochs | test acc | gap to central "
        "(points) | macro-F1 | Benign recall | recoloured (follow colour) | colour forest | "
        "unseen lab | test referred | local steps / hospital / round | minutes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in doc["scenarios"]:
        c = s["central"]
        rows = [("centralized", c, None)] + [(k, r, r) for k, r in s["variants"].items()]
        for name, r, fed in rows:
            a = r["audit"]
            gap = f"{100 * (c['accuracy'] - r['accuracy']):+.1f}" if fed else "-"
            config = r.get("config", {})
            rounds = config.get("rounds") or s["rounds"]
            # "hospital_*" modes are centralized training on one hospital's batches
            federation = fed and config.get("mode") not in ("hospital_batches", "hospital_sum",
                                                            "central")
            steps = local_steps(s["train_images"], r["epochs"], config.get("batch")
                                or doc.get("batch_size", 32)) if federation else 0.0
            budget = (f"{rounds} x {r['epochs']}" if federation
                      else f"{rounds * r['epochs'] if fed else r['epochs']} epochs")
            lines.append(
                f"| {s['hospitals']} | {s['partition']}{'' if s['labs'] else ', no labs'} | "
                f"{name} | {budget} | "
                f"{f(r['accuracy'])} | {gap} | {f(r['macro_f1'])} | "
                f"{f(r['recall']['Benign'])} | {f(a['audit_recoloured_accuracy'])} "
                f"({100 * a['audit_follow_colour']:.1f}%) | "
                f"{f(a['audit_histogram_accuracy'])} | {f(r.get('unseen_lab_accuracy'))} | "
                f"{f(s.get('referred_test'))} | "
                f"{f'{steps:.1f}' if federation else '-'} | {r['seconds'] / 60:.1f} |")
    j = doc.get("join")
    if j:
        lines += [
            "", f"## A laboratory joins ({j['hospitals']} hospitals from round 1, hospital "
            f"{j['joining_hospital']} from a laboratory outside the training range from round "
            f"{j['join_round']} of {j['rounds']})", "",
            "| | referred | accuracy |", "|---|---|---|",
            f"| joining laboratory, before it joins | {f(j['joining_lab_referred_before'])} | "
            f"{f(j['joining_lab_accuracy_before'])} |",
            f"| joining laboratory, after {j['rounds_after_join']} rounds with it | "
            f"{f(j['joining_lab_referred_after'])} | {f(j['joining_lab_accuracy_after'])} |",
            f"| the training laboratories (mean) | {f(j['other_labs_referred'])} | "
            f"{f(j['other_labs_accuracy'])} |"]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "all-pbs"))
    p.add_argument("--scenarios", default="3,10", help="HOSPITALS[:iid|dirichlet], comma list")
    p.add_argument("--variants", default="constant:schedule=constant:la=0,default")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-labs", dest="labs", action="store_false")
    p.add_argument("--append", action="store_true")
    p.add_argument("--join", type=int, default=0, help="the joining-laboratory scenario with "
                   "this many hospitals before the new one (instead of --scenarios)")
    p.add_argument("--join-round", type=int, default=7)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/federated-ablation.json"))
    p.add_argument("--doc", default=str(ROOT / "docs/benchmarks-federated-ablation.md"))
    args = p.parse_args()
    doc = header()
    doc["batch_size"] = args.batch_size
    doc["scenarios"] = []
    if args.append:
        carry_earlier(doc, args.out)
    if args.join:
        doc["join"] = join_scenario(args)
        write_json(args.out, doc)
        Path(args.doc).write_text(markdown(doc))
        return
    variants = dict(parse_variant(t) for t in args.variants.split(","))
    for text in args.scenarios.split(","):
        n, scheme = (text.split(":") + ["dirichlet"])[:2]
        print(f"== {n} hospitals, {scheme}", flush=True)
        data = load_scenario(args, int(n), scheme)
        sizes = {h: int(len(v[1])) for h, v in data["hospitals"].items()}
        print(f"  training images per hospital: {sizes}", flush=True)
        scenario: dict[str, Any] = {
            "hospitals": int(n), "partition": f"{scheme}{args.alpha if scheme != 'iid' else ''}",
            "labs": args.labs, "rounds": args.rounds, "train_images": sizes,
            "class_counts": {h: np.bincount(v[1], minlength=4).tolist()
                             for h, v in data["hospitals"].items()},
            "variants": {}, "referred_test": referred_test_share(data)}
        epochs_ref = max(v["epochs"] * (v["rounds"] or args.rounds) for v in variants.values()
                         ) // args.rounds
        # A scenario is its hospitals, partition, laboratories and rounds: --append with
        # other --rounds adds a scenario beside the one already there instead of replacing it.
        key = (int(n), scenario["partition"], args.labs, args.rounds)
        before = next((e for e in doc["scenarios"] if scenario_key(e) == key), None)
        if before and before["central"]["epochs"] == args.rounds * epochs_ref:
            scenario["central"] = before["central"]  # --append: the same reference, kept
            scenario["variants"] = before["variants"]
        else:
            scenario["central"] = central(args, data, args.rounds * epochs_ref)
            scenario["central"]["epochs"] = args.rounds * epochs_ref
        for name, v in variants.items():
            print(f"-- variant {name}: {v}", flush=True)
            if v["mode"] == "central":  # the reference itself, with this variant's norm
                r = central(args, data, v["epochs"] * (v["rounds"] or args.rounds), v["norm"],
                            logit_adjustment=v["la"] == 2, batch=v["batch"])
            elif v["mode"] == "hospital_sum":
                r = central_hospital_sum(args, data, v)
            elif v["mode"] == "hospital_batches":
                r = central_hospital_batches(args, data, v)
            else:
                r = federated(args, data, v)
            r.update(epochs=v["epochs"], config=v)
            scenario["variants"][name] = r
            print(f"  {name}: {r['accuracy']:.4f} (central {scenario['central']['accuracy']:.4f})",
                  flush=True)
            doc["scenarios"] = [s for s in doc["scenarios"]
                                if scenario_key(s) != key
                                ] + [scenario]
            write_json(args.out, doc)
            Path(args.doc).write_text(markdown(doc))


if __name__ == "__main__":
    main()
