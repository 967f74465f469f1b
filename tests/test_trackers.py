"""--report-to: TensorBoard event files and a wandb offline run folder are read back; no network."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dreambooth_min.errors import UserError
from dreambooth_min.watch.trackers import Tracker, make_tracker

CONFIG = {"lr": 1e-4, "rank": 4, "images": Path("data/dog"), "lora_targets": ("to_q", "to_k"), "prior": True}
STEPS = {1: dict(loss=0.5, loss_instance=0.3, loss_prior=0.2, lr=1e-5, grad_norm=1.5, seconds_per_step=0.25),
         2: dict(loss=0.25, loss_instance=0.125, loss_prior=0.125, lr=2e-5, grad_norm=0.75, seconds_per_step=0.5)}


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)) for _ in range(2)]


def _log_run(tracker, images):
    for step, scalars in STEPS.items():
        tracker.log(step, scalars)
    tracker.log_images(2, images, "a photo of sks dog in the snow")
    tracker.close()


def test_no_tracker_is_a_no_op(tmp_path):
    t = make_tracker("", tmp_path / "run", CONFIG, "run")
    assert type(t) is Tracker
    _log_run(t, _images())
    assert not (tmp_path / "run").exists()  # writes nothing, needs nothing


def test_unknown_kind_is_one_line(tmp_path):
    with pytest.raises(UserError, match="tensorboard or wandb") as e:
        make_tracker("mlflow", tmp_path, CONFIG, "run")
    assert "\n" not in str(e.value)


def test_tensorboard_event_files_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    images = _images()
    _log_run(make_tracker("tensorboard", tmp_path, CONFIG, "my-run"), images)
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    for key in STEPS[1]:
        events = acc.Scalars(key)
        assert [e.step for e in events] == [1, 2]
        assert [e.value for e in events] == pytest.approx([STEPS[1][key], STEPS[2][key]], rel=1e-6)
    assert sorted(acc.Tags()["images"]) == ["validation/0", "validation/1"]
    for i, im in enumerate(images):
        (event,) = acc.Images(f"validation/{i}")
        assert event.step == 2 and (event.width, event.height) == (24, 16)
        decoded = np.asarray(Image.open(__import__("io").BytesIO(event.encoded_image_string)).convert("RGB"))
        np.testing.assert_array_equal(decoded, np.asarray(im))  # PNG: lossless
    texts = {tag: acc.Tensors(tag) for tag in acc.Tags()["tensors"]}
    prompt = texts["validation/prompt/text_summary"][0]
    assert prompt.step == 2 and prompt.tensor_proto.string_val[0] == b"a photo of sks dog in the snow"
    config_text = texts["config/text_summary"][0].tensor_proto.string_val[0].decode()
    assert json.loads(config_text.strip("`\n")) == json.loads(json.dumps(CONFIG, default=str))
    assert texts["run_name/text_summary"][0].tensor_proto.string_val[0] == b"my-run"


def _wandb_records(path):
    """Records of a .wandb file: the ':W&B' header, then LevelDB-log framing (32 KiB blocks, 7-byte record
    headers: crc32, little-endian length, type 1 full / 2 first / 3 middle / 4 last) of protobuf Records."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, buf, out = Path(path).read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        n, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        buf, pos = buf + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            out.append(pb.Record.FromString(buf))
            buf = b""
    return out


@pytest.fixture
def wandb_offline(monkeypatch, tmp_path):
    pytest.importorskip("wandb")
    for k, v in dict(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(tmp_path / "wandb_home"),
                     WANDB_CONFIG_DIR=str(tmp_path / "wandb_config"), WANDB_CACHE_DIR=str(tmp_path / "wandb_cache"),
                     WANDB_DISABLE_GIT="true", WANDB_CONSOLE="off").items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def test_wandb_offline_run_folder(tmp_path, wandb_offline):
    run_dir = tmp_path / "run"
    images = _images()
    _log_run(make_tracker("wandb", run_dir, CONFIG, "my-run"), images)  # close() leaves the run file complete
    (folder,) = (run_dir / "wandb").glob("offline-run-*")
    run_id = (run_dir / "wandb_run_id.txt").read_text().strip()
    records = _wandb_records(folder / f"run-{run_id}.wandb")
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            for item in r.history.item:  # nested_key ["validation", "count"] -> history[step]["validation"]["count"]
                *path, last = list(item.nested_key) or [item.key]
                row = history.setdefault(r.history.step.num, {})
                for k in path:
                    row = row.setdefault(k, {})
                row[last] = json.loads(item.value_json)
    for step, scalars in STEPS.items():
        assert {k: history[step][k] for k in scalars} == pytest.approx(scalars, rel=1e-9)
    assert history[2]["validation"]["_type"] == "images/separated"
    assert history[2]["validation"]["captions"] == ["a photo of sks dog in the snow"] * 2
    for name, im in zip(history[2]["validation"]["filenames"], images):
        np.testing.assert_array_equal(np.asarray(Image.open(folder / "files" / name).convert("RGB")), np.asarray(im))
    assert history[2]["validation_table"]["_type"] == "table-file"
    (table_file,) = (folder / "files" / "media" / "table").glob("validation_table_2_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["step", "index", "prompt", "image"]
    assert [row[:3] for row in table["data"]] == [[2, 0, "a photo of sks dog in the snow"], [2, 1, "a photo of sks dog in the snow"]]
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.display_name == "my-run" and run.project == "dreambooth_min" and run.run_id == run_id
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert {k: config[k] for k in CONFIG} == json.loads(json.dumps(CONFIG, default=str))


@pytest.mark.parametrize("kind, package", [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_missing_package_is_one_line(monkeypatch, tmp_path, kind, package):
    monkeypatch.setitem(sys.modules, package, None)  # `import package` now raises ImportError
    with pytest.raises(UserError) as e:
        make_tracker(kind, tmp_path, CONFIG, "run")
    assert str(e.value).endswith(f"pip install {package}") and "\n" not in str(e.value)


def test_tensorboard_resume_hides_steps_past_the_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = make_tracker("tensorboard", tmp_path, CONFIG, "run")
    for step in (1, 2, 3):
        first.log(step, {"loss": float(step)})
    first.close()  # "crash" after step 3; the checkpoint was at step 1
    resumed = make_tracker("tensorboard", tmp_path, CONFIG, "run", resume_step=2)
    for step in (2, 3):
        resumed.log(step, {"loss": 10.0 * step})
    resumed.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 1.0), (2, 20.0), (3, 30.0)]


def test_a_training_run_reports_to_tensorboard(tiny_sd1, tmp_path):
    """--report-to tensorboard from train(): every step's loss parts and the validation images arrive."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_training import config

    from dreambooth_min.run.training import train

    cfg = config(tmp_path, tiny_sd1["single"], steps=3, report_to="tensorboard", validate_every=1,
                 validation_images=1, validation_steps=2, prior_weight=0.0)
    run = train(cfg, log=lambda *_: None)["output"]
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
    logged = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    losses = [e.value for e in acc.Scalars(next(t for t in acc.Tags()["scalars"] if t.endswith("loss")))]
    assert losses == pytest.approx([r["loss"] for r in logged], rel=1e-6)
    assert len(acc.Tags()["images"]) >= 1
