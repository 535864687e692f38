"""The clinician's page in Debian's chromium (Playwright, no browser download).

Reach the file chooser with the keyboard, upload an image and see
the label, the four bars, the heat map and the model version; upload an image unlike the
training images (a blank field) and see "Refer to a hematologist" with the reasons; upload
a text file and see the error. The screenshot is kept as a CI artifact:
tests/output/inference-page.png.

A second service serves a calibrated version (conformal prediction sets) that cannot tell
Benign from Pro-B on a smear-like field: the page must show "Refer to a hematologist"
for it although the image is in distribution, "Malignant: unsure", the prediction set,
and a link to the model card (tests/output/inference-page-calibrated.png).

The registered model carries the acquisition profile of synthetic smear-like fields
(services.inference.testing.smear_profile), so the in-distribution image is another such
field, not a real smear (which would rightly be referred).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, free_port
from inference_support import (
    BENIGN_PRO_WEIGHTS,
    ServiceProcess,
    calibration_entry,
    card_entry,
    register_onnx_version,
    register_tiny_model,
    smear_like,
    tiny_onnx,
)
from PIL import Image

from leukofed import probes

pytestmark = [pytest.mark.browser, pytest.mark.integration]

CHROMIUM = "/usr/bin/chromium"
NAME = "leukofed-page-it"
CALIBRATED_NAME = "leukofed-page-calibrated"
SIZE = 32
SCREENSHOT = ROOT / "tests" / "output" / "inference-page.png"
CALIBRATED_SCREENSHOT = ROOT / "tests" / "output" / "inference-page-calibrated.png"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def _need_chromium() -> None:
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        pytest.skip("Debian chromium is not installed (make setup installs it)")


def _serve(tracking_uri: str, name: str, tmp: Path, timeout: float,
           version: str | None = None) -> Iterator[ServiceProcess]:
    """One inference service process serving ``name``'s champion, stopped afterwards."""
    svc = ServiceProcess(free_port(), {
        "LEUKOFED_INFERENCE_TRACKING_URI": tracking_uri,
        "LEUKOFED_INFERENCE_MODEL_NAME": name,
        "LEUKOFED_INFERENCE_ONNX_CACHE_DIR": str(tmp / "cache"),
        "LEUKOFED_INFERENCE_THREADS": "1",
    }, tmp / "service.log")
    try:
        svc.start()
        svc.wait_ready(timeout=timeout, **({"version": version} if version else {}))
        yield svc
    finally:
        svc.stop()


@pytest.fixture(scope="module")
def service(mlflow_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    _need_chromium()
    register_tiny_model(mlflow_server.url, NAME, seed=31, image_size=SIZE, champion=True,
                        profile=True)
    yield from _serve(mlflow_server.url, NAME, tmp_path_factory.mktemp("page"), 180)


@pytest.fixture(scope="module")
def calibrated_service(mlflow_server, tmp_path_factory: pytest.TempPathFactory
                       ) -> Iterator[ServiceProcess]:
    """A tiny ONNX version (no TensorFlow, no export) that ties Benign and Pro-B on any
    smear-like field, with the smear profile, a calibration and a model card."""
    _need_chromium()
    tmp = tmp_path_factory.mktemp("page-calibrated")
    onnx = tiny_onnx(SIZE, weights=BENIGN_PRO_WEIGHTS, metadata={
        "calibration": calibration_entry(), "card": card_entry(CALIBRATED_NAME, "1")})
    version = register_onnx_version(mlflow_server.url, CALIBRATED_NAME, onnx)
    yield from _serve(mlflow_server.url, CALIBRATED_NAME, tmp, 120, version)


def sample_image(tmp_path: Path) -> Path:
    """A smear-like field of the profile's "laboratory", at the model's input size."""
    path = tmp_path / "smear-field.png"
    Image.fromarray(smear_like(SIZE, seed=7)).save(path)
    return path


def blank_image(tmp_path: Path) -> Path:
    """A field with no cell on it: must be referred, not labelled."""
    path = tmp_path / "blank-field.png"
    Image.fromarray(probes.blank_field(smear_like(SIZE, seed=7))).save(path)
    return path


def test_upload_shows_label_bars_heatmap_and_errors(service: ServiceProcess,
                                                   tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    image = sample_image(tmp_path)
    text = tmp_path / "notes.txt"
    text.write_text("this is a text file, not a smear image\n")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            # The Content-Security-Policy (services/inference/http_guards.py) must block nothing
            # the page needs: Chromium reports every blocked script/style/image here.
            console: list[str] = []
            page.on("console", lambda msg: console.append(msg.text))
            response = page.goto(service.url + "/")
            assert "default-src 'self'" in response.headers["content-security-policy"]
            expect(page.get_by_role("heading", name="Decision support, not a diagnosis")) \
                .to_be_visible()
            expect(page.locator("#model-line")).to_contain_text(f"{NAME} version 1")

            # Keyboard: Tab reaches the "Choose images" button and Enter presses it, which
            # opens the chooser (checked by spying on the input's click: Chromium shows no
            # file chooser for synthetic key presses, so the file itself is set directly).
            for _ in range(10):
                page.keyboard.press("Tab")
                if page.evaluate("document.activeElement.id") == "choose-button":
                    break
            assert page.evaluate("document.activeElement.id") == "choose-button"
            page.evaluate("""() => { window.chooserOpened = false;
                document.getElementById('file-input').addEventListener('click', (e) => {
                  window.chooserOpened = true; e.preventDefault(); }, {once: true}); }""")
            page.keyboard.press("Enter")
            assert page.evaluate("window.chooserOpened") is True
            page.set_input_files("#file-input", str(image))
            card = page.locator(".result").first
            expect(card.locator(".label-line")).to_contain_text("Most likely", timeout=30_000)
            expect(card.locator(".bars li")).to_have_count(4)
            expect(card.locator(".heat")).to_be_visible()
            assert card.locator(".heat").get_attribute("src").startswith("data:image/png")
            expect(card.locator(".model-version")).to_contain_text("version 1 (champion)")
            expect(card.locator(".filename")).to_have_text(image.name)
            expect(card.locator(".refer-box")).to_be_hidden()
            # This version carries no calibration: malignant follows the top label, and the
            # card says there is no prediction set; it has no model card either.
            expect(card.locator(".malignant-line")).to_contain_text("(from the most likely "
                                                                    "class)")
            expect(card.locator(".set-line")).to_contain_text("no prediction set")
            expect(page.locator("#calibration-line")).to_contain_text("not calibrated")
            expect(page.locator("#card-link")).to_be_hidden()

            # An image unlike the training images: the referral is the answer, with reasons;
            # the label is only shown as the model's guess.
            page.set_input_files("#file-input", str(blank_image(tmp_path)))
            referred = page.locator(".result").first
            box = referred.locator(".refer-box")
            expect(box).to_be_visible(timeout=30_000)
            expect(box).to_contain_text("Refer to a hematologist")
            expect(box.locator(".refer-reasons li").first).to_contain_text("training range")
            expect(referred.locator(".label-line")).to_contain_text("Model's guess")
            expect(referred.locator(".label-line")).not_to_contain_text("Most likely")
            expect(page.locator("#status")).to_contain_text("1 to refer to a hematologist")

            page.set_input_files("#file-input", str(text))
            bad = page.locator(".result").first
            expect(bad.get_by_role("alert")).to_contain_text("notes.txt", timeout=30_000)
            expect(bad.get_by_role("alert")).to_contain_text("not a recognised image")
            expect(page.locator("#status")).to_contain_text("1 failed")
            # The earlier results are still there under the error.
            expect(page.locator(".result")).to_have_count(3)
            violations = [m for m in console if "Content Security Policy" in m]
            assert not violations, violations
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
        finally:
            browser.close()
    assert SCREENSHOT.stat().st_size > 10_000


def test_set_based_referral_malignant_unsure_and_the_model_card(
        calibrated_service: ServiceProcess, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    image = sample_image(tmp_path)  # in distribution: only its prediction set refers it
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            console: list[str] = []
            page.on("console", lambda msg: console.append(msg.text))
            page.goto(calibrated_service.url + "/")
            expect(page.locator("#model-line")).to_contain_text(f"{CALIBRATED_NAME} version 1")
            expect(page.locator("#calibration-line")).to_have_text(
                "Probabilities calibrated (temperature 2.00); 95% prediction sets.")
            page.set_input_files("#file-input", str(image))
            card = page.locator(".result").first
            box = card.locator(".refer-box")
            expect(box).to_be_visible(timeout=30_000)
            expect(box.locator(".refer-title")).to_have_text("Refer to a hematologist")
            expect(box.locator(".refer-advice")).to_contain_text(
                "The model cannot tell Benign and Pro apart")
            expect(box.locator(".refer-reasons li")).to_have_text([
                "the 95% prediction set holds Benign and Pro: the model cannot tell them "
                "apart here"])
            expect(card.locator(".malignant-line")).to_have_text("Malignant: unsure")
            expect(card.locator(".set-line")).to_have_text(
                "95% prediction set: Benign, Pro-B ALL")
            expect(card.locator(".label-line")).to_contain_text("Model's guess, uncertain")
            expect(card.locator(".bars li.in-set")).to_have_count(2)
            expect(page.locator("#status")).to_contain_text("1 to refer to a hematologist")
            CALIBRATED_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(CALIBRATED_SCREENSHOT), full_page=True)

            link = page.locator("#card-link")
            expect(link).to_be_visible()
            with page.context.expect_page() as opened:
                link.click()
            card_page = opened.value
            card_page.wait_for_load_state()
            expect(card_page.get_by_role("heading", level=1)).to_have_text(
                f"Model card: {CALIBRATED_NAME} version 1")
            expect(card_page.get_by_role("heading", name="Conformal prediction sets")) \
                .to_be_visible()
            violations = [m for m in console if "Content Security Policy" in m]
            assert not violations, violations
        finally:
            browser.close()
