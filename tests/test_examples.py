"""The examples run as a user runs them (a few steps)."""

import importlib.util
import json
from pathlib import Path

EXAMPLES = Path(__file__).parents[1] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_segmentation_with_atrophy_trains_a_few_steps(tmp_path):
    example = load_example("segmentation_with_atrophy")
    dice = example.main(["--max-steps", "3", "--cases", "4", "--validation-cases", "2", "--batch-size", "2",
                         "--workers", "2", "--out", str(tmp_path)])
    assert set(dice) == {"dice_csf", "dice_gm", "dice_wm"}
    assert all(0.0 <= value <= 1.0 for value in dice.values())
    assert json.loads((tmp_path / "dice.json").read_text()) == dice
    assert (tmp_path / "augmented.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
