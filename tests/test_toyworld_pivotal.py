"""The toy world's pivotal-tuning comparison (examples/toyworld/pivotal.py) at tiny size: both train.py runs,
every checkpoint measured. It checks the pipeline and its files, not the numbers (those are in docs)."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples.toyworld import pivotal  # noqa: E402
from examples.toyworld.experiment import tiny_settings  # noqa: E402


def test_tiny_comparison_measures_every_checkpoint_of_both_runs(tmp_path):
    s = tiny_settings()  # 4 DreamBooth steps
    results = pivotal.run_comparison(s, tmp_path, every=2)
    saved = json.loads((tmp_path / "pivotal.json").read_text())
    for method in ("dreambooth", "pivotal"):
        assert [row["step"] for row in saved[method]["curve"]] == [0, 2, 4]
        assert all(0 <= row[k] <= 1 for row in saved[method]["curve"] for k in ("fidelity", "drift"))
    assert "--pivotal" in saved["pivotal"]["command"] and "--pivotal" not in saved["dreambooth"]["command"]
    assert (tmp_path / "runs" / "pivotal" / "embedding.safetensors").exists()
    assert pivotal.table(results).count("\n") == 4
