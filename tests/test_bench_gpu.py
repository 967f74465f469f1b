"""benchmarks.gpu: the real SD shapes, the no-CUDA line, and `--smoke` (the same code on tiny CPU models)."""
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import gpu
from dreambooth_min.unet import UNet2DConditionModel, UNetConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("make, pixels, n_params", [(UNetConfig.sd1, 512, 859_520_964), (UNetConfig.sd2, 768, 865_910_724),
                                                    (UNetConfig.sdxl, 1024, 2_567_463_684)])
def test_real_shapes_match_diffusers(make, pixels, n_params):
    """Ours and diffusers' UNet from the benchmark's config have the same tensors, and as many as the
    released SD 1.5 / SD 2.1 / SDXL base 1.0 UNets (counts of the published checkpoints)."""
    from diffusers import UNet2DConditionModel as DiffusersUNet

    cfg = make()
    with torch.device("meta"):
        ref, ours = DiffusersUNet(**gpu.diffusers_config(cfg, pixels // 8)), UNet2DConditionModel(cfg)
    assert {k: v.shape for k, v in ref.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    assert sum(p.numel() for p in ref.parameters()) == n_params


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_one_line_and_exit_0(capsys):
    assert gpu.main([]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "no CUDA device" in out


def _tables(text):
    """{section title: {row label: [cells]}} of the markdown tables printed."""
    tables, title = {}, None
    for line in text.splitlines():
        if line.startswith("### "):
            title = line[4:]
            tables[title] = {}
        elif line.startswith("| ") and title and not line.startswith(("| configuration", "| ---", "| tool")):
            cells = [c.strip() for c in line.strip("|").split("|")]
            tables[title][cells[0]] = cells[1:]
    return tables


def _expected_rows(title):
    if "SDXL" in title:
        return [row[0] for row in gpu.GOAL_ROWS if not row[5]]
    rows = [row[0] for row in gpu.ROWS if not row[5] or "SD1" in title]  # --compile: tiny-sd1 only in --smoke
    return rows + [gpu.SAMPLE_ROW]


def test_smoke_prints_the_table_with_finite_numbers():
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--smoke"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    elapsed = time.perf_counter() - start
    assert out.returncode == 0, out.stderr[-3000:]
    tables = _tables(out.stdout)
    assert [t.split(",")[0] for t in tables] == ["tiny SD1-like UNet", "tiny SD2-like UNet", "tiny SDXL-like UNet"]
    for title, rows in tables.items():
        assert "TFLOP" in title, title  # the step's counted FLOPs and the peak they are measured against
        assert list(rows)[:len(_expected_rows(title))] == _expected_rows(title), title
        for label, cells in rows.items():
            if label in ("ours", "diffusers"):  # the profiler summary: wall ms, busy ms, busy %, ops per step
                assert float(cells[0]) > 0 and float(cells[1]) > 0 and float(cells[3]) > 100, (title, cells)
                continue
            assert len(cells) == 8, (title, label)
            if "xformers" in label or "8-bit" in label:  # CUDA-only kernels: the row says so
                assert cells == ["n/a (CUDA only)"] * 2 + ["n/a"] + ["n/a (CUDA only)"] * 2 + ["n/a"] * 3, label
                continue
            values = [float(c) for c in cells[:2] + cells[3:5] + cells[6:]]  # a "failed: ..." fails here
            assert all(math.isfinite(v) for v in values), (title, label, cells)
            assert values[0] > 0 and values[2] > 0 and values[1] >= 0 and values[3] >= 0, (title, label, cells)
            assert values[4] == pytest.approx(values[0] / values[2], rel=0.02, abs=0.006)
            if label != gpu.SAMPLE_ROW:
                assert cells[2].endswith("%") and cells[5].endswith("%"), (label, cells)  # MFU
    assert "--compile: the first step took" in out.stdout
    assert "train.py loop" in out.stdout and "steps/s" in out.stdout, out.stdout[-2000:]
    print(f"smoke benchmark: {elapsed:.1f} s")
