"""docs/configuration.md is generated from the settings classes and must be current."""

from __future__ import annotations

import subprocess
import sys

from .conftest import ROOT


def test_configuration_reference_is_up_to_date() -> None:
    proc = subprocess.run([sys.executable, "scripts/gen_config_docs.py", "--check"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_every_setting_is_listed() -> None:
    from leukofed.gate import GateFloors
    from services.aggregator.settings import AggregatorSettings
    from services.client.settings import ClientSettings
    from services.inference.settings import InferenceSettings

    text = (ROOT / "docs" / "configuration.md").read_text()
    for prefix, cls in (("LEUKOFED_CLIENT_", ClientSettings),
                        ("LEUKOFED_AGGREGATOR_", AggregatorSettings),
                        ("LEUKOFED_INFERENCE_", InferenceSettings),
                        ("LEUKOFED_GATE_", GateFloors)):
        for name in cls.model_fields:
            assert f"`{prefix}{name.upper()}`" in text, name
