"""Shared fixtures: tiny seeded SD 1.x and 2.x models saved in both layouts, built once per session."""
import os
import tempfile

import pytest
import torch

# No test may reach huggingface.co or a developer's real cache: the Hub tests start their own server.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="dreambooth_min_hf_")

torch.set_num_threads(1)  # tiny models: threads only add overhead (and CI has 2 cores)


def _tiny(tmp_path_factory, version):
    from tiny import make_pipeline, save_folder, save_single_file

    root = tmp_path_factory.mktemp(f"tiny_{version}")
    pipe = make_pipeline(version)
    return dict(pipe=pipe, folder=save_folder(pipe, root / "folder"),
                single=save_single_file(pipe, root / f"tiny-{version}.safetensors"))


@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory):
    return _tiny(tmp_path_factory, "sd1")


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory):
    return _tiny(tmp_path_factory, "sd2")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    from tiny_sdxl import make_pipeline, save_folder, save_single_file

    root = tmp_path_factory.mktemp("tiny_sdxl")
    pipe = make_pipeline()
    return dict(pipe=pipe, folder=save_folder(pipe, root / "folder"),
                single=save_single_file(pipe, root / "tiny-sdxl.safetensors"))
