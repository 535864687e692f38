"""The `leukofed` command line. Service sub-commands are added by each services/*/cli.py."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import typer

from leukofed.data import DEFAULT_BLOCK_SIZE
from leukofed.protocol import DEFAULT_IMAGE_SIZE

app = typer.Typer(help="Federated ALL blood-smear classifier: data, training, export, services.",
                  no_args_is_help=True, add_completion=False)
data_app = typer.Typer(help="Read, split and partition image folders.", no_args_is_help=True)
train_app = typer.Typer(help="Train models.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(train_app, name="train")

# Service command groups (client, aggregator, inference) are entry points of the group
# "leukofed.commands" (pyproject.toml): the core does not know the services, and an
# installation without one of them simply has no such command.
COMMANDS_GROUP = "leukofed.commands"


def _register_services() -> None:
    from importlib.metadata import entry_points

    for entry in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        try:
            register = entry.load()
        except ModuleNotFoundError as exc:  # a service whose dependencies are not installed
            logging.getLogger(__name__).debug("no %s commands: %s", entry.name, exc)
            continue
        register(app)


def _scan(src: Path, block_size: int):  # noqa: ANN202 - internal helper
    from leukofed.data import scan_dataset

    ds = scan_dataset(src, block_size=block_size)
    for bad in ds.bad_files:
        typer.echo(f"skipped {bad.path}: {bad.reason}", err=True)
    if ds.duplicates:
        typer.echo(f"dropped {len(ds.duplicates)} byte-identical duplicates", err=True)
    return ds


@data_app.command("scan")
def data_scan(
    src: Path = typer.Argument(..., help="folder with one sub-folder per class"),
    block_size: int = typer.Option(DEFAULT_BLOCK_SIZE, help="file numbers per group"),
) -> None:
    """Report class counts, bad files, duplicates and the dataset fingerprint."""
    ds = _scan(src, block_size)
    typer.echo(json.dumps({"images": len(ds.records), "classes": ds.class_counts(),
                           "bad_files": len(ds.bad_files), "duplicates": len(ds.duplicates),
                           "fingerprint": ds.fingerprint}, indent=1))


@data_app.command("split")
def data_split(
    src: Path = typer.Argument(..., help="folder with one sub-folder per class"),
    out: Path = typer.Argument(..., help="JSON manifest to write"),
    val: float = typer.Option(0.15, help="validation fraction"),
    test: float = typer.Option(0.15, help="test fraction"),
    block_size: int = typer.Option(DEFAULT_BLOCK_SIZE, help="file numbers per group"),
    seed: int = typer.Option(0),
) -> None:
    """Patient-safe train/val/test split by blocks of file numbers, stratified by class."""
    from leukofed.splits import group_split, write_manifest

    ds = _scan(src, block_size)
    split = group_split(ds.records, val, test, seed)
    write_manifest(out, ds, split, seed, block_size)
    for name in ("train", "val", "test"):
        recs = split[name]
        counts = [sum(r.label == i for r in recs) for i in range(4)]
        typer.echo(f"{name:<6}{len(recs):>6} images  per class {counts}")
    typer.echo(f"wrote {out}")


@data_app.command("partition")
def data_partition(
    src: Path = typer.Argument(..., help="folder with one sub-folder per class"),
    out: Path = typer.Argument(..., help="output folder: OUT/<hospital>/<Class>/<file> links"),
    hospitals: int = typer.Option(3, help="number of hospitals"),
    scheme: str = typer.Option("dirichlet", help="iid, dirichlet (label skew) or quantity"),
    alpha: float = typer.Option(0.5, help="Dirichlet concentration (smaller: more skew)"),
    seed: int = typer.Option(0),
    block_size: int = typer.Option(DEFAULT_BLOCK_SIZE, help="file numbers per group"),
    split_manifest: Path | None = typer.Option(
        None, help="partition only this manifest's train+val images (its test set is held out)"
    ),
    force: bool = typer.Option(False, help="replace an earlier partition in OUT"),
    labs: bool = typer.Option(
        False, help="simulate laboratories: OUT/<hospital>/acquisition.json per hospital and a "
                    "test-only OUT/unseen-lab/acquisition.json (leukofed.labs)"),
    lab_seed: int | None = typer.Option(None, help="seed of the laboratories (default: --seed)"),
    unseen_kind: str = typer.Option(
        "inside", help="the unseen lab: 'inside' the hospitals' range or 'outside' it"),
    links: str = typer.Option(
        "symbolic", help="'symbolic' links, or 'hard' links for folders mounted into "
                         "containers (same file system as SRC; images are never copied)"),
) -> None:
    """Simulate hospitals: whole blocks of file numbers per hospital, every image once."""
    from leukofed.labs import KINDS, draw_labs, unseen_lab
    from leukofed.partition import class_count_table, partition_records, write_partition
    from leukofed.splits import read_manifest

    if unseen_kind not in KINDS:
        raise typer.BadParameter(f"--unseen-kind must be one of {KINDS}, got {unseen_kind!r}")
    if split_manifest:
        split = read_manifest(split_manifest)
        records = split.train + split.val
    else:
        records = _scan(src, block_size).records
    params: dict[str, object] = {
        "source": str(src.resolve()), "scheme": scheme, "alpha": alpha, "seed": seed,
        "block_size": block_size,
        "split_manifest": str(split_manifest) if split_manifest else None}
    lab_seed = seed if lab_seed is None else lab_seed
    if labs:
        params.update(lab_seed=lab_seed, unseen_kind=unseen_kind)
    try:
        parts = partition_records(records, hospitals, scheme, alpha, seed)
        manifest = write_partition(
            parts, out, params, force=force,
            labs=draw_labs(len(parts), lab_seed) if labs else None,
            unseen=unseen_lab(lab_seed, unseen_kind) if labs else None, links=links,
        )
    except (ValueError, FileExistsError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    typer.echo(class_count_table(parts))
    if labs:
        typer.echo(f"laboratories (seed {lab_seed}): one acquisition.json per hospital; "
                   f"test-only {out / 'unseen-lab' / 'acquisition.json'} ({unseen_kind})")
    typer.echo(f"wrote {manifest}")


@train_app.command("central")
def train_central(
    data: Path = typer.Argument(..., help="folder with one sub-folder per class"),
    out: Path = typer.Option(Path("artifacts/central"), help="output folder"),
    model: str = typer.Option("compact_cnn", help="compact_cnn, mobilenetv2 or efficientnetb0"),
    image_size: int = typer.Option(DEFAULT_IMAGE_SIZE, help="128 px shows cells (13+ px "
                                   "wide)"),
    augmentation: str = typer.Option("stain", help="'stain' (stain-robust) or 'basic' (old)"),
    cell_focus: bool = typer.Option(True, help="keep only the stained cells in the model"),
    rotation_ensemble: bool = typer.Option(
        True, help="answer from the four rotations of each image, averaged (inference only)"),
    alpha: float = typer.Option(0.35, help="MobileNetV2 width multiplier"),
    epochs: int = typer.Option(90, help="the stain-robust recipe keeps improving past 60"),
    batch_size: int = typer.Option(32),
    learning_rate: float = typer.Option(1e-3),
    patience: int = typer.Option(25, help="early stopping on validation macro-F1"),
    weights: Path | None = typer.Option(None, help="local ImageNet backbone weights file"),
    split_manifest: Path | None = typer.Option(None, help="use this split instead of a new one"),
    seed: int = typer.Option(0),
    jit: bool = typer.Option(False, help="XLA-compile the train step (slower on CPU here)"),
) -> None:
    """Centralized training: writes model.keras, metrics.json and confusion_matrix.png."""
    from leukofed.train import run_central

    report = run_central(
        data, out, model=model, image_size=image_size, alpha=alpha, epochs=epochs,
        batch_size=batch_size, learning_rate=learning_rate, patience=patience,
        weights=str(weights) if weights else None, split_manifest=split_manifest, seed=seed,
        jit_compile=jit, augmentation=augmentation, cell_focus=cell_focus,
        rotation_ensemble=rotation_ensemble,
    )
    from leukofed.audit import format_audit

    t = report["test"]
    typer.echo(format_audit(report["audit"]))
    typer.echo(f"test accuracy {t['accuracy']:.4f}  macro-F1 {t['macro_f1']:.4f}  "
               f"ECE {t['ece']:.4f}; referred {report['test_referred_share']:.1%}; wrote {out}")


@app.command("evaluate")
def evaluate_cmd(
    model_path: Path = typer.Argument(..., help="a .keras model saved by leukofed"),
    data: Path = typer.Argument(..., help="folder with one sub-folder per class"),
    out: Path | None = typer.Option(None, help="write metrics JSON here"),
) -> None:
    """Evaluate a saved model on an image folder: all metrics, the shortcut audit (when the
    model carries its training stain targets) and the share of images it would refer."""
    import numpy as np

    from leukofed.audit import format_audit, histogram_crossfit, prepare_audit_set, run_audit
    from leukofed.models import load_model
    from leukofed.ood import AcquisitionProfile
    from leukofed.train import Trainer, evaluate, load_arrays

    m, meta = load_model(model_path)
    ds = _scan(data, DEFAULT_BLOCK_SIZE)
    x, y = load_arrays(ds.records, int(meta["image_size"]), cache_dir=None)
    trainer = Trainer(m, jit_compile=False)
    metrics = evaluate(trainer, x, y)
    if meta.get("stain_targets") and len(x):
        audit_set = prepare_audit_set(x, y, np.asarray(meta["stain_targets"]),
                                      histogram_crossfit(x, y))
        metrics["audit"] = run_audit(trainer.predict, audit_set)
        typer.echo(format_audit(metrics["audit"]), err=True)
    refer = np.zeros(len(x), bool)
    if meta.get("acquisition_profile") and len(x):
        profile = AcquisitionProfile.from_dict(meta["acquisition_profile"])
        refer = np.array([v.refer for v in profile.judge_images(x)], bool)
        metrics["referred_share"] = float(refer.mean())
    if meta.get("calibration") and len(x):
        # What the served version would answer: calibrated probabilities, prediction sets,
        # "refer" for a set that is not one class or an image outside the profile.
        from leukofed.calibration import Calibration, answered_report

        cal = Calibration.from_dict(meta["calibration"])
        metrics["calibration"] = {"temperature": cal.temperature, "target_coverage": cal.coverage,
                                  **answered_report(cal, trainer.predict(x), y, refer)}
    text = json.dumps(metrics, indent=1, default=float)
    if out:
        out.write_text(text)
    typer.echo(text)


@app.command("export-onnx")
def export_onnx_cmd(
    model_path: Path = typer.Argument(..., help="a .keras model saved by leukofed"),
    out: Path = typer.Argument(..., help="ONNX file to write"),
    parity_data: Path | None = typer.Option(
        None, help="image folder for the parity check (default: synthetic images)"),
    parity_images: int = typer.Option(16),
    opset: int = typer.Option(17),
) -> None:
    """Export to ONNX; refuses to write a model whose outputs differ from Keras by > 1e-4."""
    from leukofed.export import ParityError, export_onnx, parity_batch
    from leukofed.models import load_model

    m, meta = load_model(model_path)
    x = parity_batch(int(meta["image_size"]), parity_data, parity_images)
    try:
        report = export_onnx(m, meta, out, x, opset=opset)
    except ParityError as exc:
        typer.echo(f"export refused: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"wrote {report.path} ({report.size_bytes} bytes, sha256 {report.sha256[:12]}, "
               f"opset {report.opset}, parity max |diff| {report.max_abs_diff:.2e} "
               f"on {report.parity_images} images)")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


_register_services()
