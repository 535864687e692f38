"""The aggregator's Keras side: the initial global model, server-side evaluation on a
held-out test set, and a Keras model holding given weights for registration."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from services.aggregator.config import RunConfig
from services.aggregator.settings import AggregatorSettings

Weights = dict[str, np.ndarray]


def predict_in_batches(model: Any, images: np.ndarray, batch: int = 128) -> np.ndarray:
    """Inference-mode probabilities of a Keras model, ``batch`` images at a time."""
    return np.concatenate([np.asarray(model(images[i:i + batch].astype(np.float32),
                                            training=False))
                           for i in range(0, len(images), batch)])


class KerasModelOps:
    def __init__(self, settings: AggregatorSettings) -> None:
        self.settings = settings
        self._models: dict[tuple[Any, ...], Any] = {}
        self._test: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
        self._audit: dict[tuple[Any, ...], Any] = {}
        self._histogram: dict[tuple[Any, ...], dict[str, float]] = {}
        self._lock = threading.Lock()

    def _model(self, cfg: RunConfig) -> Any:
        key = (cfg.model, cfg.image_size, cfg.alpha, cfg.norm, cfg.cell_focus,
               cfg.rotation_ensemble)
        if key not in self._models:
            from leukofed.models import build_model

            self._models = {key: build_model(cfg.model, cfg.image_size, alpha=cfg.alpha,
                                             norm=cfg.norm, cell_focus=cfg.cell_focus,
                                             rotation_ensemble=cfg.rotation_ensemble)}
        return self._models[key]

    def initial(self, cfg: RunConfig) -> tuple[Weights, set[str]]:
        from leukofed.models import build_model
        from leukofed.wire import batchnorm_stat_names, weights_from_model

        with self._lock:
            model = build_model(cfg.model, cfg.image_size, alpha=cfg.alpha, seed=cfg.seed,
                                norm=cfg.norm, cell_focus=cfg.cell_focus,
                                rotation_ensemble=cfg.rotation_ensemble)
            self._models = {(cfg.model, cfg.image_size, cfg.alpha, cfg.norm,
                             cfg.cell_focus, cfg.rotation_ensemble): model}
            return weights_from_model(model), batchnorm_stat_names(model)

    def keras_model(self, cfg: RunConfig, weights: Weights) -> Any:
        from leukofed.wire import set_model_weights

        model = self._model(cfg)
        set_model_weights(model, weights)
        return model

    def metadata(self, cfg: RunConfig, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        from leukofed.models import model_metadata

        return model_metadata(self._model(cfg), cfg.model, cfg.image_size,
                              {"norm": cfg.norm, "cell_focus": cfg.cell_focus,
                               "rotation_ensemble": cfg.rotation_ensemble,
                               "augmentation": cfg.augmentation, **(extra or {})})

    def parity_images(self, cfg: RunConfig, count: int = 8) -> np.ndarray:
        """Images for the ONNX parity check: the first of the server's test split when it
        has one (real smears), else seeded noise (what matters is numerical agreement)."""
        source = self._test_source(cfg)
        if source is not None:
            with self._lock:
                x, _ = self._test_arrays(source, cfg.image_size)
            if len(x):
                return x[:count]
        from leukofed.export import parity_batch

        return parity_batch(cfg.image_size, count=count)

    def _test_source(self, cfg: RunConfig) -> tuple[str, str] | None:
        if cfg.server_test_manifest or self.settings.server_test_manifest:
            return "manifest", str(cfg.server_test_manifest or self.settings.server_test_manifest)
        if cfg.server_test_dir or self.settings.server_test_dir:
            return "dir", str(cfg.server_test_dir or self.settings.server_test_dir)
        return None

    def server_predictions(self, cfg: RunConfig, weights: Weights
                           ) -> tuple[np.ndarray, np.ndarray] | None:
        """(labels, probabilities) of these weights on the server's held-out test split."""
        source = self._test_source(cfg)
        if source is None:
            return None
        with self._lock:
            x, y = self._test_arrays(source, cfg.image_size)
            return y, predict_in_batches(self.keras_model(cfg, weights), x)

    def server_audit(self, cfg: RunConfig, weights: Weights, stain_targets: Any,
                     original: np.ndarray | None = None) -> dict[str, float]:
        """The shortcut audit (leukofed.audit) of these weights on the server's test split,
        recoloured to the class stains the hospitals reported. The recoloured images are
        made once per test split and set of targets, the colour baseline (which does not
        depend on them) once per test split. ``original``: these weights' probabilities on
        the split (``server_predictions``), so they are not computed twice."""
        source = self._test_source(cfg)
        if source is None:
            return {}
        from leukofed.audit import histogram_crossfit, prepare_audit_set, run_audit

        targets = np.round(np.asarray(stain_targets, np.float64), 4)
        with self._lock:
            x, y = self._test_arrays(source, cfg.image_size)
            key = (source, cfg.image_size, targets.tobytes())
            if key not in self._audit:
                if len(x) == 0:
                    return {}
                split = (source, cfg.image_size)
                if split not in self._histogram:
                    self._histogram = {split: histogram_crossfit(x, y)}
                self._audit = {key: prepare_audit_set(x, y, targets, self._histogram[split])}
            model = self.keras_model(cfg, weights)
            return run_audit(lambda images: predict_in_batches(model, images), self._audit[key],
                             original)

    def _test_arrays(self, source: tuple[str, str], image_size: int
                     ) -> tuple[np.ndarray, np.ndarray]:
        key = (f"{source[0]}:{source[1]}", image_size)
        if key not in self._test:
            from leukofed.data import scan_dataset
            from leukofed.splits import read_manifest
            from leukofed.train import load_arrays

            kind, path = source
            records = (read_manifest(Path(path)).test if kind == "manifest"
                       else scan_dataset(path).records)
            self._test[key] = load_arrays(records, image_size, self.settings.cache_dir)
        return self._test[key]
