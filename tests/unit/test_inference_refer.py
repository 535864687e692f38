""""Refer to a hematologist": every answer of the inference service says whether the image
resembles the served version's training images (its acquisition profile, leukofed.ood).

The served models are tiny ONNX graphs (services.inference.testing.tiny_onnx) whose
metadata carries the profile of synthetic smear-like images, none, or a broken one; the
in-distribution test images come from the same generator with other seeds.
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
    encode,
    serve_fake_registry,
    smear_like,
    smear_like_images,
    smear_profile,
    tiny_onnx,
    wait_ready,
)
from PIL import Image

from leukofed import probes
from leukofed.ood import DESCRIPTORS, AcquisitionProfile
from services.inference.model_source import NO_PROFILE, load_profile
from services.inference.onnx_files import OnnxArtifact, VersionInfo, sha256

NAME = "leukofed-refer"
SIZE = 32
IN_DIST_SEED = 7  # a smear_like field of the profile's "laboratory" (profiles use >= 1000)


def _broken(**change: object) -> dict:
    return {**smear_profile(SIZE), **change}


MALFORMED = {
    "not a mapping": "acquisition profile goes here",
    "other format": _broken(format="someone-else/9"),
    "other statistics": _broken(names=["red", "green"]),
    "wrong shapes": _broken(mean=[0.5, 0.5, 0.5]),
    "missing keys": {"format": "leukofed-acquisition-profile/1"},
    "not numbers": _broken(precision="identity"),
    "non-finite": _broken(low=[float("nan")] * len(DESCRIPTORS)),
    "an older format": _broken(format="leukofed-acquisition-profile/0"),
}
# Version -> the metadata's "acquisition_profile" (None: the key is absent).
VERSIONS: dict[str, object] = {"1": "smear", "2": None,
                               **{str(10 + i): p for i, p in enumerate(MALFORMED.values())}}


class Registry:
    def __init__(self, champion: str) -> None:
        self.champion = champion

    def resolve(self) -> VersionInfo:
        return VersionInfo(NAME, self.champion, f"run-{self.champion}", {})

    def fetch(self, info: VersionInfo) -> OnnxArtifact:
        data = tiny_onnx(image_size=SIZE, seed=int(info.version),
                         profile=VERSIONS[info.version])
        return OnnxArtifact(data, sha256(data), "exported", 1e-7)


def serve(tmp_path: Path, version: str) -> TestClient:
    reg = Registry(version)
    return serve_fake_registry(tmp_path, NAME, reg.resolve, reg.fetch)



@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with serve(tmp_path, "1") as c:
        wait_ready(c)
        yield c


def png(image: np.ndarray) -> bytes:
    return encode(Image.fromarray(image), "PNG")


def in_distribution() -> np.ndarray:
    return smear_like(SIZE, IN_DIST_SEED)


def out_of_distribution() -> dict[str, np.ndarray]:
    smear = in_distribution()
    return {"blank field": probes.blank_field(smear),
            "natural photo": probes.natural_photos(SIZE, 1, seed=0)[0],
            "grayscale": probes.grayscale(smear)}


def test_test_images_and_test_profile_agree() -> None:
    # The generator and the profile are one "laboratory": most new fields are in range,
    # and every kind of probe is out of it.
    profile = AcquisitionProfile.from_dict(smear_profile(SIZE))
    fields = smear_like_images(SIZE, 20, seed=0)
    assert sum(v.in_distribution for v in profile.judge_images(fields)) >= 17
    for kind, images in probes.probe_sets(fields[:6]).items():
        assert all(v.refer for v in profile.judge_images(images)), kind


def test_smear_like_image_is_not_referred(client: TestClient) -> None:
    r = client.post("/v1/predict", files={"file": ("smear.png", png(in_distribution()),
                                                   "image/png")})
    assert r.status_code == 200, r.text
    p = r.json()["predictions"][0]
    assert p["in_distribution"] is True and p["refer"] is False
    assert p["refer_reasons"] == []
    assert 0 <= p["ood_distance"] < smear_profile(SIZE)["max_distance"]
    assert p["advice"].startswith("Decision support")
    assert p["label"] in p["probabilities"]


def test_blank_photo_and_grayscale_are_referred_with_reasons(client: TestClient) -> None:
    images = {"smear": in_distribution(), **out_of_distribution()}
    files = [("files", (f"{name}.png", png(im), "image/png")) for name, im in images.items()]
    r = client.post("/v1/predict", files=files)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["filename"] for p in preds] == [f"{n}.png" for n in images]
    assert [p["refer"] for p in preds] == [False, True, True, True]  # per image, in order
    for p in preds[1:]:
        assert p["in_distribution"] is False and p["refer_reasons"], p["filename"]
        assert p["advice"].startswith("Refer to a hematologist")
        assert p["ood_distance"] > preds[0]["ood_distance"]
        # The label and the probabilities stay, for frontends that show them de-emphasised.
        assert p["label"] in p["probabilities"]
        assert sum(p["probabilities"].values()) == pytest.approx(1, abs=1e-5)
    blank, photo, gray = (p["refer_reasons"] for p in preds[1:])
    assert any("stained white cell" in reason for reason in blank)
    assert any("saturation" in reason for reason in photo)
    assert any("saturation (saturation 0)" in reason for reason in gray)


def test_a_smear_under_another_laboratorys_stain_is_referred(client: TestClient) -> None:
    """The same smear fields under simulated laboratories outside the realistic range
    (leukofed.labs: another stain, light, blur): referred, with a reason in words."""
    from leukofed.labs import apply_batch, unseen_lab

    fields = smear_like_images(SIZE, 4, seed=IN_DIST_SEED)
    files = []
    for lab in range(4):
        stained = apply_batch(fields[lab:lab + 1], unseen_lab(200 + lab, "outside"))[0]
        files.append(("files", (f"lab{lab}.png", png(stained), "image/png")))
    r = client.post("/v1/predict", files=files)
    assert r.status_code == 200, r.text
    for p in r.json()["predictions"]:
        assert p["refer"] is True and p["in_distribution"] is False, p["filename"]
        assert p["refer_reasons"] and p["advice"].startswith("Refer to a hematologist")


def test_judged_on_the_resized_model_input(client: TestClient) -> None:
    # A larger upload is judged as the model sees it: resized by the shared preprocessing.
    from leukofed.preprocessing import load_image

    rng = np.random.default_rng(0)
    big = rng.integers(0, 256, (4 * SIZE, 3 * SIZE, 3), dtype=np.uint8)
    data = png(big)
    (expected,) = AcquisitionProfile.from_dict(smear_profile(SIZE)).judge_images(
        load_image(data, SIZE)[None])
    r = client.post("/v1/predict", files={"file": ("big.png", data, "image/png")})
    p = r.json()["predictions"][0]
    assert p["ood_distance"] == pytest.approx(expected.distance)
    assert p["refer_reasons"] == list(expected.reasons)


def test_explain_carries_the_same_verdict(client: TestClient) -> None:
    for image, refer in ((in_distribution(), False),
                         (out_of_distribution()["blank field"], True)):
        files = {"file": ("x.png", png(image), "image/png")}
        explained = client.post("/v1/explain", files=files).json()["prediction"]
        predicted = client.post("/v1/predict", files=files).json()["predictions"][0]
        assert explained["refer"] is refer
        for key in ("in_distribution", "refer_reasons", "advice"):
            assert explained[key] == predicted[key]
        assert explained["ood_distance"] == pytest.approx(predicted["ood_distance"])


def test_version_without_a_profile_says_the_check_is_unavailable(tmp_path: Path) -> None:
    with serve(tmp_path, "2") as c:
        wait_ready(c)
        for image in (in_distribution(), out_of_distribution()["blank field"]):
            r = c.post("/v1/predict", files={"file": ("x.png", png(image), "image/png")})
            assert r.status_code == 200, r.text
            p = r.json()["predictions"][0]
            assert p["in_distribution"] is None and p["refer"] is None
            assert p["ood_distance"] is None
            assert p["refer_reasons"] == [NO_PROFILE]
            assert "out-of-distribution check unavailable" in NO_PROFILE
            assert "could not be checked" in p["advice"]
        meta = c.get(f"/v2/models/{NAME}").json()
        assert [o["name"] for o in meta["outputs"]] == ["probabilities"]
        assert meta["parameters"]["ood_check"] == f"unavailable: {NO_PROFILE}"


@pytest.mark.parametrize("case", list(MALFORMED), ids=list(MALFORMED))
def test_malformed_profile_is_logged_and_predictions_still_work(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str) -> None:
    version = str(10 + list(MALFORMED).index(case))
    caplog.set_level(logging.ERROR, logger="services.inference.model_source")
    with serve(tmp_path, version) as c:
        wait_ready(c)
        r = c.post("/v1/predict", files={"file": ("x.png", png(in_distribution()),
                                                  "image/png")})
        assert r.status_code == 200, r.text
        p = r.json()["predictions"][0]
        assert p["refer"] is None and p["in_distribution"] is None
        assert "malformed" in p["refer_reasons"][0]
        assert "out-of-distribution check unavailable" in p["refer_reasons"][0]
        assert c.get("/readyz").json()["model"]["version"] == version  # served, not refused
    assert any("malformed acquisition profile" in rec.getMessage() for rec in caplog.records)


def test_load_profile_reads_a_good_profile_and_says_why_not() -> None:
    profile, note = load_profile({"acquisition_profile": smear_profile(SIZE)})
    assert isinstance(profile, AcquisitionProfile) and note == ""
    assert load_profile({}) == (None, NO_PROFILE)


def _v2(images: np.ndarray, **request: object) -> dict:
    x = images.astype(np.float32)
    return {"inputs": [{"name": "image", "datatype": "FP32", "shape": list(x.shape),
                        "data": x.reshape(-1).tolist()}], **request}


def test_v2_carries_refer_and_distance(client: TestClient) -> None:
    meta = client.get(f"/v2/models/{NAME}").json()
    assert meta["outputs"][1:] == [{"name": "refer", "datatype": "BOOL", "shape": [-1]},
                                   {"name": "ood_distance", "datatype": "FP32", "shape": [-1]}]
    assert meta["parameters"]["ood_check"] == "available"
    images = np.stack([in_distribution(), out_of_distribution()["natural photo"]])
    v1 = client.post("/v1/predict", files=[("files", (f"{i}.png", png(im), "image/png"))
                                           for i, im in enumerate(images)]).json()
    out = client.post(f"/v2/models/{NAME}/infer", json=_v2(images)).json()
    by_name = {o["name"]: o for o in out["outputs"]}
    assert list(by_name) == ["probabilities", "refer", "ood_distance"]
    assert by_name["refer"] == {"name": "refer", "datatype": "BOOL", "shape": [2],
                                "data": [False, True]}
    assert by_name["ood_distance"]["data"] == pytest.approx(
        [p["ood_distance"] for p in v1["predictions"]], rel=1e-5)
    reasons = json.loads(out["parameters"]["refer_reasons"])
    assert reasons == [p["refer_reasons"] for p in v1["predictions"]]
    assert out["parameters"]["ood_check"] == "available"

    # Only what is asked for; each output binary or JSON as asked.
    only = client.post(f"/v2/models/{NAME}/infer",
                       json=_v2(images, outputs=[{"name": "refer"}])).json()
    assert [o["name"] for o in only["outputs"]] == ["refer"]
    wrong = client.post(f"/v2/models/{NAME}/infer", json=_v2(images, outputs=[{"name": "x"}]))
    assert wrong.status_code == 400 and "'refer'" in wrong.json()["error"]


def test_v2_binary_outputs_in_order(client: TestClient) -> None:
    images = np.stack([in_distribution(), out_of_distribution()["blank field"]])
    r = client.post(f"/v2/models/{NAME}/infer",
                    json=_v2(images, parameters={"binary_data_output": True}))
    n = int(r.headers["Inference-Header-Content-Length"])
    header, data = json.loads(r.content[:n]), r.content[n:]
    arrays, offset = {}, 0
    for o in header["outputs"]:
        size = o["parameters"]["binary_data_size"]
        dtype = {"FP32": np.float32, "BOOL": np.bool_}[o["datatype"]]
        arrays[o["name"]] = np.frombuffer(data[offset:offset + size], dtype).reshape(o["shape"])
        offset += size
    assert offset == len(data)
    assert arrays["probabilities"].shape == (2, 4)
    assert arrays["refer"].tolist() == [False, True]
    assert arrays["ood_distance"][1] > arrays["ood_distance"][0] >= 0
