"""One hospital's side of federated training, free of Celery so it can be tested directly.

What leaves the hospital is exactly what these methods return: a weight blob (wire format),
example counts, and aggregate metrics (loss, accuracy, confusion-matrix counts). No image
bytes, file names or per-image predictions: the return values are built from aggregates
only, and the unit tests check it.
"""

from __future__ import annotations

import hashlib
import logging
import time
import zlib
from typing import Any

import numpy as np

from leukofed import secagg, signing
from leukofed.calibration import calibration_sums
from leukofed.data import Dataset, scan_dataset
from leukofed.labels import CLASSES
from leukofed.membership import per_image_loss
from leukofed.protocol import (
    CalibrateAnswer,
    DescribeAnswer,
    EvaluateAnswer,
    FitAnswer,
    Opaque,
    RoundConfig,
    SplitResult,
    Status,
    WireMap,
)
from leukofed.splits import Split, group_split
from leukofed.transport import (
    TASK_CALIBRATE,
    TASK_DESCRIBE,
    TASK_EVALUATE,
    TASK_FIT,
    TASK_SECAGG_KEYS,
    TASK_SECAGG_REVEAL,
    TASK_SECAGG_SHARES,
)
from leukofed.wire import WireFormatError, decode_weights, encode_weights
from services.client.audit import ParticipationLog, PauseSwitch
from services.client.completed import CompletedTasks
from services.client.secure import SecureSessions, spent_keys
from services.client.settings import ClientSettings

log = logging.getLogger(__name__)


# Head statistics: a class with fewer training images than this is not described at all.
HEAD_MIN_CLASS_IMAGES = 5


def _status(status: str, hospital: str, **extra: Any) -> WireMap:
    """A declined or error answer (leukofed.protocol.Status)."""
    return Status(status=status, hospital=hospital, **extra).encode()  # type: ignore[arg-type]


def split_metrics(y: np.ndarray, probs: np.ndarray) -> WireMap:
    """Aggregate numbers for one split: counts, mean loss, accuracy, confusion matrix. The
    aggregator sums confusion matrices over hospitals to get pooled metrics."""
    n = len(y)
    if n == 0:
        return {"n": 0}
    from leukofed.metrics import confusion_matrix

    p = np.clip(probs[np.arange(n), y], 1e-7, 1.0)
    cm = confusion_matrix(y, probs.argmax(axis=1), len(CLASSES))
    return {"n": int(n), "loss": float(-np.log(p).mean()),
            "accuracy": float(np.trace(cm) / n), "confusion_matrix": cm.tolist()}


class HospitalClient:
    """Holds the local dataset split and ONE Trainer across rounds (rebuilding a model and
    recompiling its train step every round would cost more than a small round's training)."""

    def __init__(self, settings: ClientSettings, trainers: TrainerCache | None = None
                 ) -> None:
        self.settings = settings
        # Virtual hospitals of one process share one cache (services/client/virtual.py):
        # local_fit resets the optimizer and loads the global weights every round, so a
        # Trainer carries nothing from one hospital to the next except FedBN statistics,
        # which each hospital keeps itself (_local_bn).
        self.trainers = trainers or TrainerCache()
        self.hospital = settings.hospital_id
        self.participation = ParticipationLog(settings.state_path)
        self.pause_switch = PauseSwitch(settings.state_path)
        self._dataset: Dataset | None = None
        self._split: Split | None = None
        self._arrays: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
        self._profiles: dict[tuple[str, int], WireMap] = {}
        self._local_bn_run: str | None = None  # FedBN: run whose local statistics we hold
        self._local_bn: dict[str, np.ndarray] = {}  # ...and those statistics
        # run -> (reference round, image size, member losses, non-member losses): the
        # membership audit's calibrated attack (leukofed.membership); never sent.
        self._membership_reference: dict[str, tuple[int, int, np.ndarray, np.ndarray]] = {}
        self._signing_key = (signing.load_private_key(settings.signing_key_file)
                             if settings.signing_key_file else None)
        self._aggregator_key = (signing.load_public_key(settings.aggregator_public_key_file)
                                if settings.aggregator_public_key_file else None)
        self._task_nonces = signing.NonceCache()
        # Signed tasks that ran to their answer, on disk (issue 26, finding 11): a replay is
        # refused after a restart too, while an unfinished task that Celery delivers again
        # after a crash (acks_late) still runs. nonce -> signed_at of the tasks checked here
        # and not yet answered.
        self.completed_tasks = CompletedTasks(settings.state_path, settings.task_max_age_s)
        self._verified: dict[str, float] = {}
        peers = (signing.load_public_keys(settings.peer_public_keys_dir)
                 if settings.peer_public_keys_dir else {})
        # The masked vectors already sent (participation log): a restart does not reopen them.
        self.secure = SecureSessions(self.hospital, self._signing_key, peers,
                                     min_neighbours=settings.secagg_min_neighbours,
                                     min_threshold=settings.secagg_min_threshold,
                                     spent=spent_keys(self.participation.entries()))
        # A simulated laboratory (leukofed.labs): read now, so a bad file fails at start.
        self.acquisition = settings.acquisition()
        if self.acquisition is not None:
            log.info("hospital %s: simulated laboratory %r (%s) from %s", self.hospital,
                     self.acquisition.name, self.acquisition.kind or "custom",
                     settings.acquisition_path)

    # ------------------------------------------------------------ data

    def dataset(self) -> tuple[Dataset, Split]:
        if self._dataset is None or self._split is None:
            s = self.settings
            ds = scan_dataset(s.data_dir, block_size=s.block_size)
            self._split = group_split(ds.records, s.val_fraction, s.test_fraction, s.split_seed)
            self._dataset = ds
            log.info("hospital %s: %d images (%s), %d bad files skipped", self.hospital,
                     len(ds.records), ds.class_counts(), len(ds.bad_files))
        return self._dataset, self._split

    def arrays(self, split: str, image_size: int) -> tuple[np.ndarray, np.ndarray]:
        key = (split, image_size)
        if key not in self._arrays:
            from leukofed.train import load_arrays

            _, sp = self.dataset()
            self._arrays[key] = load_arrays(sp[split], image_size, self.settings.cache_dir,
                                            acquisition=self.acquisition)
        return self._arrays[key]

    # ------------------------------------------------------------ model

    def trainer(self, cfg: RoundConfig) -> Any:
        return self.trainers.get(cfg)

    def _load_global(self, blob: bytes, cfg: RoundConfig) -> Any:
        from leukofed.wire import set_model_weights

        weights = decode_weights(blob)
        trainer = self.trainer(cfg)
        # FedBN keeps this hospital's BatchNorm statistics once it has its own for this run.
        if cfg.bn_mode == "local" and self._local_bn_run == cfg.run_id and self._local_bn:
            weights = {**weights, **{n: v for n, v in self._local_bn.items() if n in weights}}
        set_model_weights(trainer.model, weights)
        return trainer

    # ------------------------------------------------------------ gatekeeping

    def check_task(self, task: str, args: list[Any], auth: Any, cfg: RoundConfig
                    ) -> WireMap | None:
        """A decline answer for a task without a valid aggregator signature, else None. Runs
        before anything in the task is decoded, so a forged task costs the hospital nothing."""
        if self._aggregator_key is None:
            return None
        try:
            signing.verify_task(self._aggregator_key, auth, task, self.hospital, args,
                                nonces=self._task_nonces,
                                max_age_s=self.settings.task_max_age_s)
            nonce = str(auth["nonce"])
            if self.completed_tasks.completed(nonce):
                raise signing.SignatureRejected(
                    "replay", f"task with nonce {nonce} was completed here before")
        except signing.SignatureRejected as exc:
            log.warning("refused %s task: %s (%s)", task, exc.reason, exc.message)
            self.participation.append(run=cfg.run_id, round=cfg.round,
                                      task=task.rsplit(".", 1)[-1], status="refused",
                                      reason=f"task_{exc.reason}", bytes=0)
            return _status("declined", self.hospital, reason=f"task_{exc.reason}",
                           message=f"task refused: {exc.message}", round=cfg.round,
                           run_id=cfg.run_id)
        self._verified[nonce] = float(auth["signed_at"])
        while len(self._verified) > 1000:  # a task that raised leaves its nonce here
            self._verified.pop(next(iter(self._verified)))
        return None

    def task_completed(self, auth: Any) -> None:
        """Record that the task signed with ``auth`` has its answer (the worker calls this
        once the task function returned): from now on a replay of it is refused, by this
        process and by any later one. Only a task whose signature this client verified is
        recorded, so nobody else can grow the record."""
        nonce = auth.get("nonce") if isinstance(auth, dict) else None
        signed_at = self._verified.pop(str(nonce), None)
        if signed_at is not None:
            self.completed_tasks.record(str(nonce), signed_at)

    def _gate(self, task: str, cfg: RoundConfig) -> WireMap | None:
        """A decline answer when paused or past the round deadline, else None."""
        reason = None
        if self.pause_switch.paused:
            reason = "paused"
        elif cfg.deadline and time.time() > cfg.deadline:
            reason = "expired"
        if reason is None:
            return None
        self.participation.append(run=cfg.run_id, round=cfg.round, task=task,
                                  status="declined", reason=reason, bytes=0)
        return _status("declined", self.hospital, reason=reason,
                       message=f"declined: {reason}", round=cfg.round, run_id=cfg.run_id)

    # ------------------------------------------------------------ tasks

    def _prepare(self, task: str, blob: bytes, config: WireMap | None, auth: Any
                 ) -> tuple[RoundConfig, Any, WireMap | None]:
        """(round config, trainer holding the global weights, None), or (config, None, the
        answer to send instead: declined or error). The signature check runs first."""
        cfg, invalid = _decode(config)
        short = task.rsplit(".", 1)[-1]
        declined = self.check_task(task, [blob, config], auth, cfg) or self._gate(short, cfg)
        if declined:
            return cfg, None, declined
        if invalid:
            return cfg, None, self._error(short, cfg, invalid)
        try:
            return cfg, self._load_global(blob, cfg), None
        except (WireFormatError, ValueError) as exc:
            return cfg, None, self._error(short, cfg, f"global weights unusable: {exc}")

    def fit(self, blob: bytes, config: WireMap | None = None, auth: Any = None,
            task_id: str = "") -> WireMap:
        start = time.perf_counter()
        cfg, trainer, refusal = self._prepare(TASK_FIT, blob, config, auth)
        if refusal:
            return refusal
        refusal = self._second_vector("fit", cfg, blob)
        if refusal:  # before training: the same weights and seed would give the same update
            return refusal
        dp, refusal = self._privacy_plan(cfg, trainer)
        if refusal:  # before training: nothing of these images is used past their budget
            return refusal
        self._before_training(cfg)
        from leukofed.train import local_fit
        from leukofed.wire import weights_from_model

        x, y = self.arrays("train", cfg.image_size)
        loaded = time.perf_counter()
        if len(x) == 0:
            return self._error("fit", cfg, "no training images at this hospital")
        seed = (cfg.seed * 1_000_003 + cfg.round * 101
                + zlib.crc32(self.hospital.encode())) % 2**31
        if dp is not None:
            stats = self._dp_fit(cfg, trainer, x, y, dp)
        else:
            stats = local_fit(trainer, x, y, epochs=cfg.local_epochs,
                              batch_size=cfg.batch_size,
                              learning_rate=cfg.learning_rate,
                              proximal_mu=cfg.proximal_mu,
                              class_balanced=cfg.class_balanced, seed=seed,
                              logit_adjustment=cfg.logit_adjustment,
                              augmentation=cfg.augmentation)
        trained = time.perf_counter()
        own = weights_from_model(trainer.model)
        if cfg.bn_mode == "local":
            self._local_bn_run = cfg.run_id
            self._local_bn = {n: own[n].copy() for n in self.trainers.bn_names if n in own}
        weights = self._trained_weights(own, cfg)
        if cfg.dp_mode == "local":
            from leukofed.privacy import privatize_local

            # Local DP: clipped and noised here, so neither the broker nor the aggregator
            # ever sees this hospital's exact update. OS entropy, never a known seed.
            weights = privatize_local(decode_weights(blob), weights, cfg.dp_clip_norm,
                                      cfg.dp_noise_multiplier, np.random.default_rng())
        spent = {k: float(v) for k, v in stats.items() if k.startswith("dp_")}
        # Under DP-SGD the training loss and accuracy stay here: exact aggregates over the
        # sampled images, outside the noise. What was spent is sent instead.
        metrics = ({k: v for k, v in spent.items() if k != "dp_epsilon_total"} if dp else
                   {"loss": float(stats["loss"]), "accuracy": float(stats["accuracy"])})
        extra = {
            "metrics": metrics,
            "class_counts": _counts(y), "dataset_fingerprint": self.dataset()[0].fingerprint,
            **(self.training_profile(cfg.image_size) if cfg.send_profile else {}),
        }
        if cfg.secure is not None:
            return self._secure_fit(cfg, blob, weights, len(x), extra,
                                    {"load_s": loaded - start,
                                     "train_s": float(stats["train_seconds"])}, start,
                                    log_extra=spent)
        out = encode_weights(weights, fp16=cfg.fp16)
        digest = hashlib.sha256(out).hexdigest()
        done = time.perf_counter()
        self.participation.append(run=cfg.run_id, round=cfg.round, task="fit",
                                  status="ok", bytes=len(out), sha256=digest,
                                  num_examples=int(len(x)), fp16=cfg.fp16,
                                  learning_rate=cfg.learning_rate,
                                  logit_adjustment=cfg.logit_adjustment, **spent)
        answer = FitAnswer.model_validate(dict(
            hospital=self.hospital, run_id=cfg.run_id, round=cfg.round, weights=out,
            bytes=len(out), sha256=digest, num_examples=int(len(x)),
            timings={"load_s": loaded - start, "train_s": float(stats["train_seconds"]),
                     "encode_s": done - trained, "total_s": done - start}, **extra)).encode()
        return self._sign_answer(answer, cfg, blob=blob, task_id=task_id)

    # ------------------------------------------------------------ privacy budget

    @property
    def ledger(self) -> Any:
        """What this hospital's images have spent (leukofed.dp_sgd.HospitalLedger)."""
        from leukofed.dp_sgd import HospitalLedger

        return HospitalLedger(self.settings.state_path)

    def _privacy_plan(self, cfg: RoundConfig, trainer: Any) -> tuple[Any, WireMap | None]:
        """(DP-SGD parameters for this round or None, None), or (None, the refusal): a
        round past the run's target epsilon or past this hospital's own limit
        (``max_epsilon``), or a fit without example-level DP while that limit is set."""
        limit = self.settings.max_epsilon
        if cfg.dp_level != "example":
            if limit is None:
                return None, None
            return None, self._refuse_budget(
                cfg, "fit", f"this hospital accepts only example-level differentially private "
                f"training (its LEUKOFED_CLIENT_MAX_EPSILON is {limit:g}); a fit without it "
                "would spend an unbounded epsilon on its images")
        from leukofed import dp_sgd

        try:
            dp_sgd.check_model(trainer.model)
        except dp_sgd.BatchMixingModel as exc:
            return None, self._error("fit", cfg, str(exc))
        n = len(self.dataset()[1]["train"])
        if n == 0:
            return None, self._error("fit", cfg, "no training images at this hospital")
        if cfg.dp_clip_norm <= 0 or cfg.dp_delta <= 0 or (
                cfg.dp_noise_multiplier <= 0 and (cfg.dp_target_epsilon <= 0
                                                  or cfg.dp_rounds < 1)):
            return None, self._error("fit", cfg, "example-level DP needs dp_clip_norm, "
                                     "dp_delta and a noise multiplier or a target epsilon "
                                     "with the run's rounds")
        q, steps = dp_sgd.sampling_plan(n, cfg.batch_size, cfg.local_epochs)
        sigma = cfg.dp_noise_multiplier or dp_sgd.calibrate_noise(
            cfg.dp_target_epsilon, cfg.dp_delta, q, steps * cfg.dp_rounds)
        event = (sigma, q, steps)
        ledger = self.ledger
        if cfg.dp_target_epsilon > 0:
            after = ledger.epsilon(cfg.dp_delta, run=cfg.run_id, extra=event)
            if after > cfg.dp_target_epsilon * (1 + 1e-6):
                spent = ledger.epsilon(cfg.dp_delta, run=cfg.run_id)
                return None, self._refuse_budget(
                    cfg, "fit", f"this round would take the run's epsilon on this "
                    f"hospital's images from {spent:.3f} to {after:.3f} at delta "
                    f"{cfg.dp_delta:g}, above the run's target {cfg.dp_target_epsilon:g}")
        if limit is not None:
            delta = self.settings.epsilon_delta
            after = ledger.epsilon(delta, extra=event)
            if after > limit:
                spent = ledger.epsilon(delta)
                return None, self._refuse_budget(
                    cfg, "fit", f"this round would take this hospital's epsilon over all "
                    f"runs from {spent:.3f} to {after:.3f} at delta {delta:g}, above its "
                    f"limit {limit:g} (LEUKOFED_CLIENT_MAX_EPSILON)")
        return dp_sgd.DPSGDParams(cfg.dp_clip_norm, sigma, q, steps), None

    def _dp_fit(self, cfg: RoundConfig, trainer: Any, x: np.ndarray, y: np.ndarray,
                dp: Any) -> dict[str, float]:
        """DP-SGD training (leukofed.dp_sgd), then the spending recorded in the ledger
        before anything of it leaves. Returns local_fit's numbers and the dp_ ones."""
        from leukofed.dp_sgd import LedgerEntry, dp_local_fit

        stats = dp_local_fit(trainer, x, y, dp, learning_rate=cfg.learning_rate,
                             proximal_mu=cfg.proximal_mu, class_balanced=cfg.class_balanced,
                             augmentation=cfg.augmentation,
                             logit_adjustment=cfg.logit_adjustment)
        ledger = self.ledger
        ledger.record(LedgerEntry(cfg.run_id, cfg.round, dp.noise_multiplier,
                                  dp.sampling_rate, dp.steps, dp.clip_norm))
        event = (dp.noise_multiplier, dp.sampling_rate, dp.steps)
        spent = ledger.epsilon(cfg.dp_delta, run=cfg.run_id)
        log.info("fit round %s: DP-SGD %d steps, noise %.3f, q %.4f: run epsilon %.3f at "
                 "delta %g", cfg.round, dp.steps, dp.noise_multiplier, dp.sampling_rate,
                 spent, cfg.dp_delta)
        return {**stats, "dp_epsilon": spent,
                "dp_epsilon_next": ledger.epsilon(cfg.dp_delta, run=cfg.run_id, extra=event),
                "dp_noise_multiplier": dp.noise_multiplier, "dp_delta": cfg.dp_delta,
                "dp_epsilon_total": ledger.epsilon(self.settings.epsilon_delta)}

    def _refuse_budget(self, cfg: RoundConfig, task: str, message: str) -> WireMap:
        """A task this hospital's privacy budget does not allow: said in its log (and the
        participation log) and in its answer."""
        log.warning("refused %s round %s of run %s: %s", task, cfg.round, cfg.run_id, message)
        self.participation.append(run=cfg.run_id, round=cfg.round, task=task,
                                  status="refused", reason="privacy_budget", message=message,
                                  bytes=0)
        return _status("declined", self.hospital, reason="privacy_budget",
                       message=f"refused: {message}", round=cfg.round, run_id=cfg.run_id)

    def _second_vector(self, task: str, cfg: RoundConfig, blob: bytes) -> WireMap | None:
        """An error answer when a masked vector for this run, round, purpose and global
        weights already left (services.client.secure), else None; plain tasks pass."""
        if cfg.secure is None:
            return None
        try:
            self.secure.refuse_second_vector(cfg, hashlib.sha256(blob).hexdigest())
        except secagg.SecAggError as exc:
            return self._error(task, cfg, f"secure aggregation: {exc.reason}: {exc.message}")
        return None

    def _secure_fit(self, cfg: RoundConfig, blob: bytes, weights: dict[str, np.ndarray],
                    n: int, extra: WireMap, timings: dict[str, float], start: float,
                    log_extra: dict[str, float] | None = None) -> WireMap:
        """The update as a masked vector (leukofed.secagg, services.client.secure)."""
        from services.client.secure import update_to_sum

        global_weights = decode_weights(blob)
        delta, weight, extras = update_to_sum(cfg.secure, global_weights, weights, n)
        answer = self._masked_answer("fit", cfg, blob, global_weights, delta, weight, extras,
                                     n, log_extra)
        if answer["status"] != "ok":
            return answer
        done = time.perf_counter()
        answer.update(extra, timings={**timings, "total_s": done - start,
                                      "encode_s": done - start - sum(timings.values())})
        return self.secure.sign_masked(cfg, answer)  # last: over every field it carries

    def _masked_answer(self, task: str, cfg: RoundConfig, blob: bytes,
                       like: dict[str, np.ndarray], tensors: dict[str, np.ndarray],
                       weight: float, extras: dict[str, float], n: int,
                       log_extra: dict[str, float] | None = None) -> WireMap:
        """A fit or calibrate answer under secure aggregation: the masked vector, logged in
        the participation log; a protocol error is an error answer with its reason. Not yet
        signed: the caller adds its fields, then signs it whole (SecureSessions.sign_masked)."""
        digest = hashlib.sha256(blob).hexdigest()
        try:
            answer = self.secure.masked(cfg, like, tensors, weight, extras,
                                        global_sha256=digest, sign=False)
        except secagg.SecAggError as exc:
            return self._error(task, cfg, f"secure aggregation: {exc.reason}: {exc.message}")
        # Written (and fsynced) before the vector leaves: the key a restarted worker reloads.
        self.participation.append(run=cfg.run_id, round=cfg.round, task=task,
                                  status="ok", bytes=len(answer["masked"]), secure=True,
                                  num_examples=int(n), global_sha256=digest,
                                  purpose=str((cfg.secure or {}).get("purpose")),
                                  **(log_extra or {}))
        answer["bytes"] = len(answer["masked"])
        return answer

    def training_profile(self, image_size: int) -> WireMap:
        """What this hospital's training images look like, as aggregate numbers only: the
        acquisition profile's sufficient statistics (for "refer") and per-class sums of stain
        statistics (for the shortcut audit's recolouring). Computed once per image size."""
        key = ("profile", image_size)
        if key not in self._profiles:
            from leukofed.audit import stain_sums
            from leukofed.ood import ProfileStats

            x, y = self.arrays("train", image_size)
            self._profiles[key] = {
                "acquisition": ProfileStats.of_images(x).to_dict(),
                "stain_sums": stain_sums(x, y, len(CLASSES)),
            }
        return self._profiles[key]

    def evaluate(self, blob: bytes, config: WireMap | None = None, auth: Any = None,
                 task_id: str = "") -> WireMap:
        start = time.perf_counter()
        cfg, trainer, refusal = self._prepare(TASK_EVALUATE, blob, config, auth)
        if refusal:
            return refusal
        splits = {}
        held_out: list[np.ndarray] = []  # per-image losses: the audit's non-members
        for name in ("val", "test"):
            x, y = self.arrays(name, cfg.image_size)
            splits[name] = {"n": 0}
            if len(x):
                probs = trainer.predict(x)
                # Sums over the split for every candidate temperature: the aggregator fits
                # the version's calibration from them without any per-image score.
                splits[name] = {**split_metrics(y, probs),
                                "calibration": calibration_sums(probs, y)}
                held_out.append(per_image_loss(probs, y))
        # A hospital with its own epsilon limit sends nothing computed on its training
        # images outside DP-SGD: the audit's member histogram is an exact count of them.
        membership = (self._membership(cfg, trainer, held_out)
                      if cfg.membership_images and self.settings.max_epsilon is None
                      else None)
        self.participation.append(run=cfg.run_id, round=cfg.round, task="evaluate",
                                  status="ok", bytes=0,
                                  num_examples=sum(s["n"] for s in splits.values()),
                                  **({"membership_histograms": sorted(membership["attacks"])}
                                     if membership else {}))
        answer = EvaluateAnswer(
            hospital=self.hospital, run_id=cfg.run_id, round=cfg.round,
            splits={k: SplitResult.model_validate(v) for k, v in splits.items()},
            num_examples=splits["test"]["n"], seconds=time.perf_counter() - start,
            membership=membership).encode()
        return self._sign_answer(answer, cfg, kind="evaluation", blob=blob,
                                 task_id=task_id)

    def _membership(self, cfg: RoundConfig, trainer: Any, held_out: list[np.ndarray]
                    ) -> Opaque | None:
        """The membership-inference audit's histograms (leukofed.membership): the global
        model's per-image loss on a fixed sample of up to ``membership_images`` training
        images (members) and on the val and test images (non-members), binned on the shared
        edges. The losses under the reference round's model stay here, in memory, for the
        calibrated attack of later rounds; only histograms leave. None without images."""
        from leukofed.membership import hospital_histograms

        x, y = self.arrays("train", cfg.image_size)
        used = min(len(x), cfg.membership_images)
        nonmember = np.concatenate(held_out) if held_out else np.zeros(0)
        if used == 0 or not len(nonmember):
            return None
        # The same images every round (a fixed seed), so a reference loss matches its image.
        idx = np.sort(np.random.default_rng(0).permutation(len(x))[:used])
        member = per_image_loss(trainer.predict(x[idx]), y[idx])
        ref = self._membership_reference.get(cfg.run_id)
        if cfg.round == cfg.membership_reference_round:
            self._membership_reference = {cfg.run_id: (cfg.round, cfg.image_size, member,
                                                       nonmember)}
        elif (ref is not None and ref[0] < cfg.round and ref[1] == cfg.image_size
              and ref[2].shape == member.shape and ref[3].shape == nonmember.shape):
            return hospital_histograms(member, nonmember, ref[2], ref[3], ref[0])
        return hospital_histograms(member, nonmember)

    def calibrate(self, blob: bytes, config: WireMap | None = None, auth: Any = None,
                  task_id: str = "") -> WireMap:
        """BatchNorm moving statistics of the given global weights, measured exactly on up to
        ``calibration_images`` un-augmented local training images. Leaves the hospital: one
        mean and one variance per channel and the image count (the aggregator pools them);
        the same kind of numbers every fit update carries in its BatchNorm tensors."""
        start = time.perf_counter()
        cfg, trainer, refusal = self._prepare(TASK_CALIBRATE, blob, config, auth)
        if refusal:
            return refusal
        if self.settings.max_epsilon is not None:
            return self._refuse_budget(
                cfg, "calibrate", "exact statistics of this hospital's training images are "
                f"outside any epsilon, and its LEUKOFED_CLIENT_MAX_EPSILON is "
                f"{self.settings.max_epsilon:g}")
        if cfg.measure == "head":
            return self._head_statistics(cfg, trainer, blob, task_id, start)
        refusal = self._second_vector("calibrate", cfg, blob)
        if refusal:
            return refusal
        from leukofed.train import recalibrate_batchnorm
        from leukofed.wire import weights_from_model

        x, _ = self.arrays("train", cfg.image_size)
        used = min(len(x), cfg.calibration_images)
        if used == 0 or not self.trainers.bn_names:
            return self._error("calibrate", cfg, "no training images or no BatchNorm layer")
        recalibrate_batchnorm(trainer.model, x, max_images=used)
        weights = weights_from_model(trainer.model)
        if cfg.secure is not None:
            stats = {n: weights[n] for n in sorted(self.trainers.bn_names)}
            # First and second moments, weighted by the images used: they sum exactly.
            answer = self._masked_answer("calibrate", cfg, blob, stats,
                                         secagg.bn_moments(stats), float(used),
                                         {"count": 1.0}, used)
            if answer["status"] != "ok":
                return answer
            answer["seconds"] = time.perf_counter() - start
            return self.secure.sign_masked(cfg, answer)
        tensors = {n: weights[n] for n in sorted(self.trainers.bn_names)}
        return self._measured_answer(cfg, "calibrate", "calibration", tensors, used, blob,
                                     task_id, start)

    def _measured_answer(self, cfg: RoundConfig, task: str, kind: str,
                         tensors: dict[str, np.ndarray], used: int, blob: bytes,
                         task_id: str, start: float) -> WireMap:
        """A calibrate task's plain answer: the measured tensors, logged and signed."""
        out = encode_weights(tensors)
        digest = hashlib.sha256(out).hexdigest()
        self.participation.append(run=cfg.run_id, round=cfg.round, task=task, status="ok",
                                  bytes=len(out), sha256=digest, num_examples=used)
        answer = CalibrateAnswer(
            hospital=self.hospital, run_id=cfg.run_id, round=cfg.round, weights=out,
            bytes=len(out), sha256=digest, num_examples=used,
            seconds=time.perf_counter() - start).encode()
        return self._sign_answer(answer, cfg, kind=kind, blob=blob, task_id=task_id)

    def _head_statistics(self, cfg: RoundConfig, trainer: Any, blob: bytes, task_id: str,
                         start: float) -> WireMap:
        """Per-class count, sum and sum of outer products of the classifier head's input
        features of the global weights, over up to ``calibration_images`` un-augmented
        training images (leukofed.head_rebalance). Leaves the hospital: those sums, the
        same kind of aggregate as BatchNorm statistics (per class, not per channel), for
        the aggregator to refit a class-balanced head. Not offered under secure aggregation
        or differential privacy: the aggregator does not ask then."""
        from leukofed.head_rebalance import class_feature_stats
        from leukofed.train import head_features

        if cfg.secure is not None:
            return self._error("calibrate", cfg, "head statistics are not secure-aggregated")
        x, y = self.arrays("train", cfg.image_size)
        used = min(len(x), cfg.calibration_images)
        if used == 0:
            return self._error("calibrate", cfg, "no training images")
        idx = np.random.default_rng(0).permutation(len(x))[:used]
        features, labels = head_features(trainer.model, x[idx], y[idx])
        turns = len(features) // used  # rows per image: 4 with the rotation ensemble
        stats = class_feature_stats(features, labels, len(CLASSES),
                                    min_rows=turns * HEAD_MIN_CLASS_IMAGES)
        tensors = {f"head/{k}": v for k, v in stats.to_arrays().items()}
        return self._measured_answer(cfg, "head_statistics", "head statistics", tensors,
                                     used, blob, task_id, start)

    def describe(self, auth: Any = None, config: WireMap | None = None, blob: bytes = b"",
                 task_id: str = "") -> WireMap:
        """This hospital's declaration: split sizes, class counts, fingerprint. Signed for
        the run, round, task and nonce the aggregator's signed task names, so it is never
        valid for another run or task (issue 26, finding 1)."""
        cfg, invalid = _decode(config)
        declined = self.check_task(TASK_DESCRIBE, [blob, config], auth, cfg)
        if declined:  # checked first: an unsigned caller learns not even the pause state
            return declined
        if self.pause_switch.paused:
            return _status("declined", self.hospital, reason="paused",
                           message="declined: paused", round=cfg.round, run_id=cfg.run_id)
        if invalid:
            return self._error("describe", cfg, invalid)
        ds, sp = self.dataset()
        answer = DescribeAnswer.model_validate(dict(
            hospital=self.hospital, run_id=cfg.run_id, round=cfg.round,
            class_counts=ds.class_counts(), num_images=len(ds.records),
            splits={n: len(sp[n]) for n in ("train", "val", "test")},
            split_counts={n: _counts(np.array([r.label for r in sp[n]], np.int64))
                          for n in ("train", "val", "test")},
            dataset_fingerprint=ds.fingerprint, bad_files=len(ds.bad_files),
            paused=self.pause_switch.paused, nonce=cfg.nonce)).encode()
        # Signed: the split sizes it declares bound every count it claims later.
        return self._sign_answer(answer, cfg, kind="describe", task_id=task_id)

    def secure_stage(self, task: str, blob: bytes, config: WireMap | None, auth: Any
                     ) -> WireMap:
        """A secure-aggregation stage of its own: keys, shares or reveal (services.client.
        secure). Signed and gated like every task; a protocol error is an error answer with
        its reason, never an exception on the worker."""
        cfg, invalid = _decode(config)
        short = task.rsplit(".", 1)[-1]
        declined = self.check_task(task, [blob, config], auth, cfg) or self._gate(short, cfg)
        if declined:
            return declined
        if invalid:
            return self._error(short, cfg, invalid)
        try:
            if task == TASK_SECAGG_KEYS:
                train = len(self.dataset()[1]["train"])
                purpose = (cfg.secure or {}).get("purpose")
                cap = train if purpose == "fit" else min(train, cfg.calibration_images)
                return self.secure.keys(cfg, cap)
            if task == TASK_SECAGG_SHARES:
                return self.secure.shares(cfg)
            if task == TASK_SECAGG_REVEAL:
                return self.secure.reveal(cfg)
        except secagg.SecAggError as exc:
            return self._error(short, cfg, f"{exc.reason}: {exc.message}")
        return self._error(short, cfg, f"unknown secure-aggregation task {task!r}")

    # ------------------------------------------------------------ helpers

    def _error(self, task: str, cfg: RoundConfig, message: str) -> WireMap:
        log.error("%s round %s: %s", task, cfg.round, message)
        self.participation.append(run=cfg.run_id, round=cfg.round, task=task,
                                  status="error", reason=message, bytes=0)
        return _status("error", self.hospital, reason=message, round=cfg.round,
                       run_id=cfg.run_id)

    def _sign_answer(self, answer: WireMap, cfg: RoundConfig,
                     kind: str = "update", blob: bytes = b"", task_id: str = "",
                     key: Any = None) -> WireMap:
        """Attach this hospital's signature of ``kind`` (leukofed.signing.sign_answer): run,
        round, hospital, nonce, the answer's content, the task id and the global weights.
        Unsigned when the hospital has no key (development mode only: leukofed.startup)."""
        key = key or self._signing_key
        if key is None:
            return answer
        answer["signature"] = signing.sign_answer(
            key, kind, self.hospital, cfg.run_id, cfg.round, answer,
            signing.blob_digest(blob) if blob else "", str(task_id or ""))
        return answer

    def sign_refusal(self, answer: WireMap, task_id: str = "") -> WireMap:
        """A declined or error answer signed (kind ``status``) for the run and round it
        names and the task it answers, so the reason the aggregator records is this
        hospital's (issue 26, finding 7). The worker calls it on every answer it sends;
        answers that are not refusals, or already signed, pass unchanged."""
        if (self._signing_key is None or not isinstance(answer, dict)
                or answer.get("status") == "ok" or "signature" in answer):
            return answer
        answer["signature"] = signing.sign_answer(
            self._signing_key, "status", self.hospital, str(answer.get("run_id", "")),
            int(answer.get("round", 0) or 0), answer, "", str(task_id or ""))
        return answer

    # Two seams, no-ops here. The test suite's drills (tests/integration/drills.py) override
    # them to stall a hospital or make it send a bad update, against real processes.

    def _before_training(self, cfg: RoundConfig) -> None:
        """Called after a fit task is accepted, before the data is loaded."""

    def _trained_weights(self, weights: dict[str, np.ndarray], cfg: RoundConfig
                         ) -> dict[str, np.ndarray]:
        """The locally trained weights, as they will be sent (before any local DP)."""
        return weights


def _decode(config: Any) -> tuple[RoundConfig, str | None]:
    """The round configuration, or the defaults and why it was refused (the task's
    signature is checked before the refusal is answered)."""
    try:
        return RoundConfig.decode(config), None
    except ValueError as exc:
        run = config.get("run_id", "") if isinstance(config, dict) else ""
        return RoundConfig(run_id=str(run)), str(exc)


def _counts(y: np.ndarray) -> dict[str, int]:
    counts = np.bincount(y, minlength=len(CLASSES)) if len(y) else np.zeros(len(CLASSES), int)
    return {name: int(counts[i]) for i, name in enumerate(CLASSES)}


class TrainerCache:
    """One Trainer per model configuration (rebuilding a model and recompiling its train step
    every round would cost more than a small round's training). Shared by the virtual
    hospitals of one worker process, so 200 of them hold one model, not 200."""

    def __init__(self) -> None:
        self.key: tuple[Any, ...] | None = None
        self.trainer: Any = None
        self.bn_names: set[str] = set()

    def get(self, cfg: RoundConfig) -> Any:
        key = (cfg.model, cfg.image_size, cfg.alpha, cfg.norm,
               cfg.cell_focus, cfg.rotation_ensemble, cfg.jit_compile)
        if self.key != key:
            from leukofed.models import build_model
            from leukofed.train import Trainer
            from leukofed.wire import batchnorm_stat_names

            model = build_model(cfg.model, cfg.image_size, alpha=cfg.alpha,
                                norm=cfg.norm, cell_focus=cfg.cell_focus,
                                rotation_ensemble=cfg.rotation_ensemble)
            self.trainer = Trainer(model, learning_rate=cfg.learning_rate,
                                   jit_compile=cfg.jit_compile)
            self.key = key
            self.bn_names = batchnorm_stat_names(model)
        return self.trainer
