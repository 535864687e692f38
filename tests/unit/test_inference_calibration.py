"""Answers a clinician can trust: calibrated probabilities, conformal prediction sets,
"malignant: yes / no / unsure", set-based referral and the model card.

The served models are tiny ONNX graphs (services.inference.testing.tiny_onnx) whose logits
are the image's mean colour times COLOUR_WEIGHTS, so a solid colour picks the
probabilities: red is confidently Benign, green confidently Pro, blue ties Pre and Pro,
yellow ties Benign and Pro, magenta ties Benign, Pre and Pro. The calibration
(``calibration_entry``: temperature 2, coverage 0.95, every quantile 0.6) puts a class in
the set when its calibrated probability is >= 0.4: one class for a confident image, both
tied classes for a two-way tie, none for a three-way tie.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from inference_support import (
    BENIGN_PRO_WEIGHTS,
    COLOUR_WEIGHTS,
    calibration_entry,
    card_entry,
    encode,
    serve_fake_registry,
    smear_like,
    wait_ready,
)
from PIL import Image

from leukofed.calibration import Calibration, apply_temperature
from leukofed.card import card_html, card_markdown
from services.inference.answers import (
    NO_CALIBRATION,
    NO_CARD,
    answers,
    load_calibration,
    load_card,
    malignant,
)
from services.inference.app import create_app
from services.inference.model_source import ADVICE_REFER, ADVICE_SUPPORT, ModelSource, Referral
from services.inference.onnx_files import OnnxArtifact, VersionInfo, sha256
from services.inference.settings import InferenceSettings

NAME = "leukofed-calibrated"
SIZE = 32
CLASSES = ["Benign", "Early", "Pre", "Pro"]
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
           "yellow": (255, 255, 0), "magenta": (255, 0, 255)}
# colour -> (prediction set, malignant): what the calibration must give
EXPECTED = {"red": (["Benign"], "no"), "green": (["Pro"], "yes"),
            "blue": (["Pre", "Pro"], "yes"), "yellow": (["Benign", "Pro"], "unsure"),
            "magenta": ([], "unsure")}
MALFORMED = {
    "not a mapping": "temperature 1.5",
    "other format": {**calibration_entry(), "format": "someone-else/1"},
    "three quantiles": {**calibration_entry(), "quantiles": [0.5, 0.5, 0.5]},
    "negative temperature": {**calibration_entry(), "temperature": -1.0},
    "quantile above 1": {**calibration_entry(), "quantiles": [0.5, 0.5, 0.5, 1.5]},
    "coverage not a number": {**calibration_entry(), "coverage": "most"},
}
# Version -> tiny_onnx keyword arguments.
VERSIONS: dict[str, dict] = {
    "1": {"weights": COLOUR_WEIGHTS, "profile": None,
          "metadata": {"calibration": calibration_entry(), "card": card_entry(NAME, "1")}},
    "2": {"weights": COLOUR_WEIGHTS, "profile": None},  # neither calibration nor card
    # In distribution (smear profile) but Benign and Pro tied: referred by its set alone.
    "3": {"weights": BENIGN_PRO_WEIGHTS,
          "metadata": {"calibration": calibration_entry(), "card": card_entry(NAME, "3")}},
    "4": {"weights": COLOUR_WEIGHTS, "profile": None,
          "metadata": {"card": {"format": "leukofed-model-card/0"}}},
    **{str(10 + i): {"weights": COLOUR_WEIGHTS, "profile": None,
                     "metadata": {"calibration": bad}}
       for i, bad in enumerate(MALFORMED.values())},
}


class Registry:
    def __init__(self, champion: str) -> None:
        self.champion = champion

    def resolve(self) -> VersionInfo:
        return VersionInfo(NAME, self.champion, f"run-{self.champion}", {})

    def fetch(self, info: VersionInfo) -> OnnxArtifact:
        data = tiny_onnx_for(info.version)
        return OnnxArtifact(data, sha256(data), "exported", 1e-7)


def tiny_onnx_for(version: str) -> bytes:
    from inference_support import tiny_onnx

    return tiny_onnx(image_size=SIZE, **VERSIONS[version])


def serve(tmp_path: Path, version: str) -> TestClient:
    reg = Registry(version)
    return serve_fake_registry(tmp_path, NAME, reg.resolve, reg.fetch)



@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with serve(tmp_path, "1") as c:
        wait_ready(c)
        yield c


def solid(colour: str) -> np.ndarray:
    return np.broadcast_to(np.array(COLOURS[colour], np.uint8), (SIZE, SIZE, 3)).copy()


def png(image: np.ndarray) -> bytes:
    return encode(Image.fromarray(image), "PNG")


def raw_probs(colour: str, weights: np.ndarray = COLOUR_WEIGHTS) -> np.ndarray:
    logits = np.array(COLOURS[colour], np.float64) @ weights
    e = np.exp(logits - logits.max())
    return e / e.sum()


def predict(client: TestClient, *colours: str) -> list[dict]:
    files = [("files", (f"{c}.png", png(solid(c)), "image/png")) for c in colours]
    r = client.post("/v1/predict", files=files)
    assert r.status_code == 200, r.text
    return r.json()["predictions"]


# ----------------------------------------------------------------- the answer, as a function

CAL = Calibration(2.0, 0.95, (0.6,) * 4)
IN = Referral(True, False, (), 1.0)
OUT = Referral(False, True, ("mean colour saturation is above the training range",), 40.0)
UNCHECKED = Referral(None, None, ("out-of-distribution check unavailable",), None)


def one(probs: list[float], referral: Referral = IN, calibration: Calibration | None = CAL):
    (answer,) = answers(CLASSES, np.array([probs]), [referral], calibration, NO_CALIBRATION)
    return answer


def test_a_confident_image_gets_one_class_and_is_not_referred() -> None:
    a = one([0.97, 0.01, 0.01, 0.01])
    assert a.prediction_set == ("Benign",) and a.malignant == "no"
    assert a.refer is False and a.reasons == () and a.advice == ADVICE_SUPPORT
    assert a.calibrated and a.temperature == 2.0 and a.coverage == 0.95
    b = one([0.01, 0.01, 0.01, 0.97])
    assert b.prediction_set == ("Pro",) and b.malignant == "yes" and b.refer is False


def test_an_ambiguous_image_gets_two_classes_and_is_referred_in_words() -> None:
    a = one([0.02, 0.02, 0.48, 0.48])
    assert a.prediction_set == ("Pre", "Pro")
    assert a.malignant == "yes"  # malignant for sure; the subtype is what is uncertain
    assert a.refer is True and a.in_distribution is True
    assert a.reasons == ("the 95% prediction set holds Pre and Pro: the model cannot tell "
                         "them apart here",)
    assert a.advice.startswith("Refer to a hematologist: the model cannot tell Pre and Pro "
                               "apart")
    b = one([0.48, 0.02, 0.02, 0.48])
    assert b.prediction_set == ("Benign", "Pro") and b.malignant == "unsure" and b.refer


def test_an_empty_set_is_unsure_and_referred() -> None:
    a = one([0.33, 0.01, 0.33, 0.33])
    assert a.prediction_set == () and a.malignant == "unsure" and a.refer is True
    assert a.reasons == ("the 95% prediction set is empty: no class fits this image well "
                         "enough for the model to name one",)
    assert "no class enters the model's 95% prediction set" in a.advice


def test_out_of_distribution_keeps_its_advice_and_adds_the_set_reason() -> None:
    a = one([0.97, 0.01, 0.01, 0.01], OUT)
    assert a.refer is True and a.advice == ADVICE_REFER and a.reasons == OUT.reasons
    b = one([0.02, 0.02, 0.48, 0.48], OUT)
    assert b.refer is True and b.advice == ADVICE_REFER
    assert b.reasons[0] == OUT.reasons[0] and "holds Pre and Pro" in b.reasons[1]
    # Not checked: a single class leaves refer unknown, an ambiguous set still refers.
    assert one([0.97, 0.01, 0.01, 0.01], UNCHECKED).refer is None
    c = one([0.02, 0.02, 0.48, 0.48], UNCHECKED)
    assert c.refer is True and c.advice.startswith("Refer to a hematologist")


def test_calibrated_probabilities_differ_from_raw_when_t_is_not_1() -> None:
    raw = [0.9, 0.05, 0.03, 0.02]
    a = one(raw)
    assert a.probabilities == pytest.approx(apply_temperature(np.array(raw), 2.0))
    assert not np.allclose(a.probabilities, raw) and a.probabilities.sum() == pytest.approx(1)
    assert a.label == "Benign" and a.probabilities[0] < raw[0]  # T > 1: less confident
    assert one(raw, calibration=Calibration(1.0, 0.95, (0.6,) * 4)).probabilities == \
        pytest.approx(raw)


def test_without_calibration_the_top_label_decides_and_refer_is_the_ood_check() -> None:
    a = one([0.2, 0.1, 0.3, 0.4], calibration=None)
    assert a.prediction_set is None and a.malignant == "yes" and a.refer is False
    assert not a.calibrated and a.temperature is None and a.coverage is None
    assert a.calibration_note == NO_CALIBRATION and a.probabilities.tolist() == \
        pytest.approx([0.2, 0.1, 0.3, 0.4])
    assert one([0.4, 0.3, 0.2, 0.1], calibration=None).malignant == "no"
    assert one([0.4, 0.3, 0.2, 0.1], OUT, calibration=None).refer is True
    assert malignant(None, "Benign") == "no" and malignant((), "Pro") == "unsure"


def test_load_calibration_reads_a_good_one_and_says_why_not() -> None:
    cal, note = load_calibration({"classes": CLASSES, "calibration": calibration_entry()})
    assert cal == CAL and note == ""
    assert load_calibration({"classes": CLASSES}) == (None, NO_CALIBRATION)
    cal, note = load_calibration({"classes": CLASSES[:3], "calibration": calibration_entry()})
    assert cal is None and "malformed" in note


def test_load_card_renders_it_once() -> None:
    card = card_entry(NAME, "1")
    loaded, note = load_card({"card": card})
    assert note == "" and loaded.data == card
    assert loaded.markdown == card_markdown(card) and loaded.html == card_html(card)
    assert loaded.summary.startswith(f"model card {NAME} version 1")
    assert load_card({}) == (None, NO_CARD)
    loaded, note = load_card({"card": ["not", "a", "card"]})
    assert loaded is None and "malformed" in note
    # Written before the registry numbered the version ("round 3"): served with its number.
    loaded, _ = load_card({"card": card_entry(NAME, "round 3")}, version="7")
    assert loaded.data["model"]["version"] == "7" and "version 7" in loaded.summary


# ------------------------------------------------------------------------ through the app

def test_predict_returns_sets_malignant_and_refer_per_image(client: TestClient) -> None:
    preds = predict(client, *COLOURS)
    assert [p["filename"] for p in preds] == [f"{c}.png" for c in COLOURS]
    for colour, p in zip(COLOURS, preds):
        expected_set, expected_malignant = EXPECTED[colour]
        assert p["prediction_set"] == expected_set, colour
        assert p["malignant"] == expected_malignant, colour
        assert p["calibrated"] is True and p["temperature"] == 2.0 and p["coverage"] == 0.95
        assert p["calibration_note"] is None
        # No acquisition profile here: a single class leaves refer unknown, others refer.
        assert p["refer"] is (True if len(expected_set) != 1 else None), colour
        assert p["in_distribution"] is None
    blue, yellow, magenta = preds[2], preds[3], preds[4]
    assert "the 95% prediction set holds Pre and Pro: the model cannot tell them apart " \
           "here" in blue["refer_reasons"]
    assert any("prediction set holds Benign and Pro" in r for r in yellow["refer_reasons"])
    assert any("prediction set is empty" in r for r in magenta["refer_reasons"])
    for p in (blue, yellow, magenta):
        assert p["advice"].startswith("Refer to a hematologist")


def test_predict_returns_calibrated_probabilities(client: TestClient) -> None:
    for colour, p in zip(COLOURS, predict(client, *COLOURS)):
        probs = list(p["probabilities"].values())
        raw = raw_probs(colour)
        assert probs == pytest.approx(apply_temperature(raw, 2.0), abs=1e-5), colour
        assert sum(probs) == pytest.approx(1, abs=1e-6)
        assert p["label"] == CLASSES[int(np.argmax(raw))]
    red = predict(client, "red")[0]["probabilities"]["Benign"]
    assert red == pytest.approx(0.9949, abs=1e-3) and red < raw_probs("red")[0] - 0.004


def test_explain_carries_the_same_answer(client: TestClient) -> None:
    files = {"file": ("blue.png", png(solid("blue")), "image/png")}
    explained = client.post("/v1/explain", files=files).json()["prediction"]
    predicted = client.post("/v1/predict", files=files).json()["predictions"][0]
    for key in ("prediction_set", "malignant", "refer", "refer_reasons", "advice",
                "calibrated", "temperature", "coverage"):
        assert explained[key] == predicted[key], key
    assert explained["probabilities"] == pytest.approx(predicted["probabilities"], abs=1e-6)


def test_in_distribution_image_referred_by_its_set_alone(tmp_path: Path) -> None:
    with serve(tmp_path, "3") as c:
        wait_ready(c)
        r = c.post("/v1/predict", files={"file": ("smear.png", png(smear_like(SIZE, 7)),
                                                  "image/png")})
        p = r.json()["predictions"][0]
        assert p["in_distribution"] is True and p["refer"] is True
        assert p["prediction_set"] == ["Benign", "Pro"] and p["malignant"] == "unsure"
        assert p["refer_reasons"] == ["the 95% prediction set holds Benign and Pro: the "
                                      "model cannot tell them apart here"]
        assert p["advice"].startswith("Refer to a hematologist: the model cannot tell "
                                      "Benign and Pro apart")


def test_version_without_calibration_answers_as_before(tmp_path: Path) -> None:
    with serve(tmp_path, "2") as c:
        wait_ready(c)
        preds = predict(c, *COLOURS)
        for colour, p in zip(COLOURS, preds):
            assert p["calibrated"] is False and p["temperature"] is None
            assert p["prediction_set"] is None and p["coverage"] is None
            assert p["calibration_note"] == NO_CALIBRATION
            assert list(p["probabilities"].values()) == pytest.approx(raw_probs(colour),
                                                                      abs=1e-5)
            assert p["malignant"] == ("no" if p["label"] == "Benign" else "yes")
            assert p["refer"] is None  # no profile either: nothing could be checked
        m = c.get("/v1/model").json()
        assert m["calibration"] == {"available": False, "temperature": None,
                                    "coverage": None, "quantiles": None,
                                    "note": NO_CALIBRATION}
        assert m["card"]["available"] is False and m["card"]["note"] == NO_CARD
        card = c.get("/v1/model/card")
        assert card.status_code == 404
        assert card.json()["error"] == (f"model {NAME!r} version 2 has no model card: "
                                         f"{NO_CARD}")
        meta = c.get(f"/v2/models/{NAME}").json()
        assert [o["name"] for o in meta["outputs"]] == ["probabilities"]
        assert meta["parameters"]["calibration"] == f"unavailable: {NO_CALIBRATION}"


@pytest.mark.parametrize("case", list(MALFORMED), ids=list(MALFORMED))
def test_malformed_calibration_is_logged_and_answers_say_it_is_unavailable(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str) -> None:
    version = str(10 + list(MALFORMED).index(case))
    caplog.set_level(logging.ERROR, logger="services.inference.answers")
    with serve(tmp_path, version) as c:
        wait_ready(c)
        for p in predict(c, "blue", "red"):
            assert p["calibrated"] is False and p["prediction_set"] is None
            assert "calibration is malformed" in p["calibration_note"]
            assert "no prediction set" in p["calibration_note"]
        assert c.get("/readyz").json()["model"]["version"] == version  # served, not refused
        assert c.get("/v1/model").json()["calibration"]["available"] is False
        v2 = c.post(f"/v2/models/{NAME}/infer", json=_v2(np.stack([solid("red")])))
        assert v2.status_code == 200
        assert v2.json()["parameters"]["calibration"].startswith("unavailable: this model "
                                                                 "version's calibration is "
                                                                 "malformed")
    logged = [r for r in caplog.records if "malformed calibration" in r.getMessage()]
    assert len(logged) == 1  # once, when the version loads; not per request


def test_model_route_says_calibration_and_card(client: TestClient) -> None:
    m = client.get("/v1/model").json()
    assert m["calibration"] == {"available": True, "temperature": 2.0, "coverage": 0.95,
                                "quantiles": dict.fromkeys(CLASSES, 0.6), "note": None}
    assert m["card"]["available"] is True and m["card"]["url"] == "/v1/model/card"
    assert m["card"]["summary"].startswith(f"model card {NAME} version 1")
    assert m["ood_check"].startswith("unavailable: ")


def test_model_card_as_markdown_html_and_json(client: TestClient) -> None:
    card = card_entry(NAME, "1")
    md = client.get("/v1/model/card")
    assert md.status_code == 200 and md.headers["content-type"].startswith("text/markdown")
    assert md.text == card_markdown(card)
    assert md.text.startswith(f"# Model card: {NAME} version 1")
    assert md.headers["x-model-version"] == "1"
    html = client.get("/v1/model/card?format=html")
    assert html.headers["content-type"].startswith("text/html")
    assert html.text == card_html(card) and "<h1>Model card:" in html.text
    # Its inline style may apply; nothing may run.
    csp = html.headers["content-security-policy"]
    assert "style-src 'unsafe-inline'" in csp and "script-src" not in csp
    assert "default-src 'none'" in csp
    browser = client.get("/v1/model/card", headers={"Accept": "text/html,*/*;q=0.8"})
    assert browser.text == html.text
    assert client.get("/v1/model/card?format=md", headers={"Accept": "text/html"}).text == \
        md.text
    assert client.get("/v1/model/card?format=json").json() == card
    assert client.get("/v1/model/card?format=pdf").status_code == 422


def test_malformed_card_is_a_404_with_the_reason(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="services.inference.answers")
    with serve(tmp_path, "4") as c:
        wait_ready(c)
        r = c.get("/v1/model/card?format=html")
        assert r.status_code == 404 and "model card is malformed" in r.json()["error"]
        assert "leukofed-model-card/1" in r.json()["error"]
        assert c.get("/v1/model").json()["card"]["available"] is False
        assert predict(c, "red")[0]["prediction_set"] is None  # and it still predicts
    assert any("malformed model card" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------- V2

def _v2(images: np.ndarray, **request: object) -> dict:
    x = images.astype(np.float32)
    return {"inputs": [{"name": "image", "datatype": "FP32", "shape": list(x.shape),
                        "data": x.reshape(-1).tolist()}], **request}


def test_v2_lists_and_returns_prediction_set_and_malignant(client: TestClient) -> None:
    meta = client.get(f"/v2/models/{NAME}").json()
    assert meta["outputs"] == [
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 4]},
        {"name": "refer", "datatype": "BOOL", "shape": [-1]},
        {"name": "prediction_set", "datatype": "BOOL", "shape": [-1, 4]},
        {"name": "malignant", "datatype": "BYTES", "shape": [-1]}]
    assert meta["parameters"]["calibration"] == "available"
    assert meta["parameters"]["temperature"] == 2.0 and meta["parameters"]["coverage"] == 0.95
    images = np.stack([solid(c) for c in COLOURS])
    v1 = predict(client, *COLOURS)
    out = client.post(f"/v2/models/{NAME}/infer", json=_v2(images)).json()
    by_name = {o["name"]: o for o in out["outputs"]}
    assert list(by_name) == ["probabilities", "refer", "prediction_set", "malignant"]
    assert by_name["probabilities"]["data"] == pytest.approx(
        [v for p in v1 for v in p["probabilities"].values()], abs=1e-6)  # calibrated too
    mask = np.array(by_name["prediction_set"]["data"]).reshape(by_name["prediction_set"]
                                                               ["shape"])
    assert mask.shape == (5, 4)
    assert [[c for c, m in zip(CLASSES, row) if m] for row in mask] == \
        [p["prediction_set"] for p in v1]
    assert by_name["malignant"] == {"name": "malignant", "datatype": "BYTES", "shape": [5],
                                    "data": [p["malignant"] for p in v1]}
    assert by_name["refer"]["data"] == [bool(p["refer"]) for p in v1]
    assert json.loads(out["parameters"]["refer_reasons"]) == [p["refer_reasons"] for p in v1]
    assert out["parameters"]["calibration"] == "available"
    assert out["parameters"]["temperature"] == 2.0 and out["parameters"]["coverage"] == 0.95


def test_v2_binary_prediction_set_and_malignant(client: TestClient) -> None:
    images = np.stack([solid("red"), solid("yellow"), solid("magenta")])
    r = client.post(f"/v2/models/{NAME}/infer",
                    json=_v2(images, outputs=[{"name": "prediction_set"},
                                              {"name": "malignant"}],
                             parameters={"binary_data_output": True}))
    assert r.status_code == 200, r.text
    n = int(r.headers["Inference-Header-Content-Length"])
    header, data = json.loads(r.content[:n]), r.content[n:]
    assert [o["name"] for o in header["outputs"]] == ["prediction_set", "malignant"]
    sizes = [o["parameters"]["binary_data_size"] for o in header["outputs"]]
    assert sum(sizes) == len(data)
    mask = np.frombuffer(data[:sizes[0]], np.bool_).reshape(3, 4)
    assert mask.tolist() == [[True, False, False, False], [True, False, False, True],
                             [False] * 4]
    # BYTES: each element a 4-byte little-endian length and its bytes (Triton's layout).
    raw, words = data[sizes[0]:], []
    while raw:
        length = int.from_bytes(raw[:4], "little")
        words.append(raw[4:4 + length].decode())
        raw = raw[4 + length:]
    assert words == ["no", "unsure", "unsure"]


def test_model_card_needs_the_api_key_when_one_is_set(tmp_path: Path) -> None:
    s = InferenceSettings(tracking_uri="http://unused", model_name=NAME, poll_interval_s=0.05,
                          onnx_cache_dir=tmp_path, threads=1, api_key="sesame")
    reg = Registry("1")
    with TestClient(create_app(s, ModelSource(s, resolver=reg.resolve,
                                              fetch_onnx=reg.fetch))) as c:
        wait_ready(c)
        assert c.get("/v1/model/card").status_code == 401
        ok = c.get("/v1/model/card?format=json", headers={"X-API-Key": "sesame"})
        assert ok.status_code == 200 and ok.json()["format"] == "leukofed-model-card/1"


def test_cli_table_shows_malignant_and_the_set(client: TestClient) -> None:
    from services.inference.cli import format_table

    body = client.post("/v1/predict", files=[
        ("files", (f"{c}.png", png(solid(c)), "image/png")) for c in ("red", "blue")]).json()
    lines = format_table(body).splitlines()
    assert lines[0].split()[:4] == ["file", "label", "malignant", "set"]
    assert lines[1].split()[:4] == ["red.png", "Benign", "no", "Benign"]
    assert lines[2].split()[:4] == ["blue.png", "Pre", "yes", "Pre,Pro"]
    assert "REFER to a hematologist" in lines[2]
    assert "probabilities calibrated (temperature 2.00)" in format_table(body)
