"""Models by name through a stand-in Hub (tests/hub_server.py): real huggingface_hub downloads, real bytes
over HTTP on 127.0.0.1, pointed there with HF_ENDPOINT and an isolated HF_HOME."""
import importlib
import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors.torch import load_file, save

from dreambooth_min.errors import UserError
from dreambooth_min.formats import checkpoint, hub as hubmod
from hub_server import FakeHub

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # sample.py
CLEARED = ("HF_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE",
           "HF_HUB_DISABLE_PROGRESS_BARS")


def _env(monkeypatch, **env):
    """Set environment variables and re-read huggingface_hub's constants, which it reads at import."""
    for k, v in env.items():
        monkeypatch.delenv(k, raising=False) if v is None else monkeypatch.setenv(k, v)
    importlib.reload(huggingface_hub.constants)


def _folder_files(folder):
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _half(path):
    return save({k: v.half() if v.is_floating_point() else v for k, v in load_file(path).items()})


@pytest.fixture(scope="module")
def repos(tiny_sd1):
    """Repo contents: the tiny SD 1.x folder with fp16 variants and files we must never fetch."""
    folder = Path(tiny_sd1["folder"])
    files = _folder_files(folder)
    for sub, stem in hubmod.COMPONENTS.items():
        files[f"{sub}/{stem}.fp16.safetensors"] = _half(folder / sub / f"{stem}.safetensors")
        files[f"{sub}/{stem}.bin"] = b"PK\x03\x04 pickle decoy"
    files["safety_checker/config.json"] = b"{}"
    files["safety_checker/model.safetensors"] = save({"w": torch.zeros(3)})
    files["v1-5-pruned.safetensors"] = Path(tiny_sd1["single"]).read_bytes()
    files["v1-5-pruned.ckpt"] = b"PK\x03\x04 pickle decoy"
    old = dict(files)  # an older commit: the same weights, a v-prediction scheduler config
    cfg = json.loads(files["scheduler/scheduler_config.json"])
    old["scheduler/scheduler_config.json"] = json.dumps(dict(cfg, prediction_type="v_prediction")).encode()
    return dict(sd=files, old=old, single={"sub/tiny-sd1.safetensors": Path(tiny_sd1["single"]).read_bytes()})


@pytest.fixture
def hub(repos, tmp_path, monkeypatch):
    server = FakeHub().start()
    server.sha_old = server.add("tiny/sd1", repos["old"], ref="old")
    server.sha = server.add("tiny/sd1", repos["sd"])
    server.add(hubmod.SHORT_NAMES["sd15"], repos["sd"])
    server.add("tiny/single", repos["single"])
    server.add("tiny/gated", repos["sd"], gated=True)
    server.add("tiny/bert", {"config.json": b"{}", "model.safetensors": save({"w": torch.zeros(2)})})
    server.add("tiny/sd3", {k: v for k, v in repos["sd"].items() if k.endswith(".json")}
               | {"text_encoder_3/config.json": b"{}", "transformer/config.json": b"{}"})
    _env(monkeypatch, HF_ENDPOINT=server.url, HF_HOME=str(tmp_path / "hf"), **dict.fromkeys(CLEARED))
    yield server
    server.stop()
    monkeypatch.undo()
    importlib.reload(huggingface_hub.constants)


def _same_weights(a, b):
    for ma, mb in ((a.unet, b.unet), (a.vae, b.vae), (a.text_encoder, b.text_encoder)):
        sa, sb = ma.state_dict(), mb.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k


def _got(server):
    return {p.split("/", 5)[5] for p in server.requested("GET")}


def test_repo_id_loads_what_the_folder_holds_fetching_only_what_load_reads(hub, tiny_sd1):
    lines = []
    sd = checkpoint.load("tiny/sd1", log=lines.append)
    _same_weights(sd, checkpoint.load(tiny_sd1["folder"]))
    assert (sd.name, sd.version, sd.prediction_type) == ("tiny/sd1", "sd1", "epsilon")
    assert sd.source == {"repo_id": "tiny/sd1", "revision": hub.sha, "file": None}
    wanted = {"model_index.json", "scheduler/scheduler_config.json", "unet/config.json", "vae/config.json",
              "text_encoder/config.json", "unet/diffusion_pytorch_model.safetensors",
              "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"}
    got = _got(hub)
    assert wanted <= got and all(p.startswith("tokenizer/") for p in got - wanted)
    total = sum(len(hub.repos["tiny/sd1"].commits[hub.sha][p]) for p in got)
    assert len(lines) == 1 and lines[0].startswith(f"fetching tiny/sd1 (commit {hub.sha[:10]}) from {hub.url}: ")
    assert f"{len(got)} files, {total / 1e6:.1f} MB" in lines[0]
    # Second time: everything is in the cache; one listing request, no file request, nothing said.
    n = len(hub.log)
    lines.clear()
    _same_weights(checkpoint.load("tiny/sd1", log=lines.append), sd)
    assert lines == [] and hub.requested("GET")[len(got):] == [] and len(hub.log) <= n + 2


def test_fp16_variant_when_fp16_runs(hub, tiny_sd1):
    sd = checkpoint.load("tiny/sd1", dtype=torch.float16)
    got = _got(hub)
    assert {"unet/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
            "text_encoder/model.fp16.safetensors"} <= got
    assert not any(p.endswith("model.safetensors") and ".fp16." not in p for p in got)
    _same_weights(sd, checkpoint.load(tiny_sd1["folder"], dtype=torch.float16))


def test_revision_is_honoured_and_recorded(hub):
    old = checkpoint.load("tiny/sd1", revision="old")
    assert old.prediction_type == "v_prediction" and old.source["revision"] == hub.sha_old
    assert checkpoint.load("tiny/sd1", revision=hub.sha_old).source["revision"] == hub.sha_old
    assert checkpoint.load("tiny/sd1").prediction_type == "epsilon"
    with pytest.raises(UserError, match="tiny/sd1 has no revision 'nope'"):
        checkpoint.load("tiny/sd1", revision="nope")
    with pytest.raises(UserError, match="--revision is for Hub models"):
        hubmod.resolve_model(str(ROOT / "README.md"), revision="v1")


def test_single_file_in_a_repo(hub, tiny_sd1):
    sd = checkpoint.load("tiny/single/sub/tiny-sd1.safetensors")
    _same_weights(sd, checkpoint.load(tiny_sd1["single"]))
    assert sd.source == {"repo_id": "tiny/single", "revision": hub.repos["tiny/single"].refs["main"],
                         "file": "sub/tiny-sd1.safetensors"}
    assert sd.name == "tiny-sd1"
    with pytest.raises(UserError, match="tiny/single has no file sub/x.safetensors .*sub/tiny-sd1.safetensors"):
        checkpoint.load("tiny/single/sub/x.safetensors")


def test_short_names_and_the_default_model(hub, tmp_path):
    assert hubmod.parse_spec("sd21-base") == ("stabilityai/stable-diffusion-2-1-base", None)
    assert hubmod.DEFAULT_MODEL == "sd15"
    assert hubmod.SHORT_NAMES["sd15"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    empty = tmp_path / "weights"
    empty.mkdir()
    spec = checkpoint.find_default_model(empty)
    assert spec == "sd15"
    sd = checkpoint.load(spec)
    assert sd.source["repo_id"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"


def test_parse_spec_tells_paths_from_repo_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights").mkdir()
    assert hubmod.parse_spec("owner/name") == ("owner/name", None)
    assert hubmod.parse_spec("owner/name/a/b.safetensors") == ("owner/name", "a/b.safetensors")
    for local in ("weights/sd15", "./a/b", "/x/y", "~/m", "m.safetensors", "a/m.safetensors", "sd99", "a/b/c.txt"):
        assert hubmod.parse_spec(local) is None, local
    with pytest.raises(UserError, match="pickle"):
        hubmod.parse_spec("owner/name/model.ckpt")
    with pytest.raises(UserError, match=r"^model not found: weights/sd15 does not exist \(a model is .*sd15"):
        checkpoint.load("weights/sd15")


def test_offline_from_the_cache_and_not_cached(hub, monkeypatch, tmp_path):
    first = checkpoint.load("tiny/sd1")
    single = checkpoint.load("tiny/single/sub/tiny-sd1.safetensors")
    hub.stop()  # no server at all: nothing may be asked
    _env(monkeypatch, HF_HUB_OFFLINE="1")
    lines = []
    again = checkpoint.load("tiny/sd1", log=lines.append)
    _same_weights(first, again)
    assert again.source == first.source and lines == []
    assert checkpoint.load("tiny/single/sub/tiny-sd1.safetensors").source == single.source
    assert checkpoint.load("tiny/sd1", revision="main").source == first.source
    with pytest.raises(UserError) as e:
        checkpoint.load("tiny/gated")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("tiny/gated is not in the Hugging Face cache")
    assert "HF_HUB_OFFLINE=1 is set" in msg and "`hf download tiny/gated --include" in msg
    # The advice works: that command, run where the Hub is reachable, gives a folder load() reads.
    hub.start()
    command = shlex.split(msg.split("`")[1])
    env = {k: v for k, v in os.environ.items() if k not in CLEARED} | {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_good"}
    r = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    _same_weights(checkpoint.load(tmp_path / "weights" / "gated"), first)
    with pytest.raises(UserError, match="`hf download tiny/single sub/other.safetensors --local-dir weights/`"):
        checkpoint.load("tiny/single/sub/other.safetensors")


def _closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_hub_uses_the_cache_or_says_so(hub, monkeypatch):
    first = checkpoint.load("tiny/sd1")
    _env(monkeypatch, HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}")
    lines = []
    assert checkpoint.load("tiny/sd1", log=lines.append).source == first.source
    assert len(lines) == 1 and "cannot be reached" in lines[0] and "from the cache" in lines[0]
    with pytest.raises(UserError, match=r"^tiny/bert is not in the Hugging Face cache .* cannot be reached \("):
        checkpoint.load("tiny/bert")


@pytest.mark.parametrize("spec, env, message", [
    ("nobody/nothing", {}, r"^model not found: no repo nobody/nothing on http://127\.0\.0\.1:\d+ \(or it is private"),
    ("tiny/gated", {}, r"^tiny/gated is a gated repo: accept its conditions at http://.*/tiny/gated, then log in "
                       r"with `hf auth login` \(or set HF_TOKEN\)$"),
    ("tiny/gated", {"HF_TOKEN": "hf_bad"}, "^your Hugging Face token has no access to the gated repo tiny/gated"),
    ("tiny/bert", {}, r"^tiny/bert is not a diffusers Stable Diffusion repo \(no model_index.json\)"),
    ("tiny/sd3", {}, r"^tiny/sd3 is a diffusion-transformer model \(SD3, Flux, ...: no UNet\)"),
    ("sd99", {}, r"^model not found: sd99 does not exist"),
])
def test_errors_are_one_line(hub, monkeypatch, spec, env, message):
    _env(monkeypatch, **env)
    with pytest.raises(UserError, match=message) as e:
        checkpoint.load(spec)
    assert "\n" not in str(e.value)
    assert not any(p.startswith(f"/{spec}/") for p in hub.requested("GET"))  # nothing downloaded


def test_gated_repo_with_a_token(hub, monkeypatch):
    _env(monkeypatch, HF_TOKEN="hf_good")
    assert checkpoint.load("tiny/gated").source["repo_id"] == "tiny/gated"


def test_dropped_connection_is_retried_to_the_right_bytes(hub, tiny_sd1):
    hub.cut_once.add("tiny/sd1/unet/diffusion_pytorch_model.safetensors")
    sd = checkpoint.load("tiny/sd1")
    assert hub.requested("GET").count(f"/tiny/sd1/resolve/{hub.sha}/unet/diffusion_pytorch_model.safetensors") == 2
    _same_weights(sd, checkpoint.load(tiny_sd1["folder"]))


def _sample(hub_env, out, *extra):
    cmd = [sys.executable, "sample.py", "--prompt", "a red cube", "--height", "64", "--width", "64", "--steps", "2",
           "--no-progress", "--out", str(out), *extra]
    env = {k: v for k, v in os.environ.items() if k not in CLEARED} | hub_env
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)


def test_sample_cli_by_repo_id_then_offline(hub, tmp_path):
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "cli-hf")}
    r = _sample(env, tmp_path / "a.png", "--model", "tiny/sd1", "--revision", "old")
    assert r.returncode == 0, r.stderr
    assert f"fetching tiny/sd1 (commit {hub.sha_old[:10]}) from {hub.url}: " in r.stdout
    n = len(hub.log)
    r = _sample(env | {"HF_HUB_OFFLINE": "1"}, tmp_path / "b.png", "--model", "tiny/sd1", "--revision", "old")
    assert r.returncode == 0, r.stderr
    assert "fetching" not in r.stdout and len(hub.log) == n  # not one request
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_sample_cli_unreachable_hub_one_line_exit_2(hub, tmp_path, monkeypatch, capsys):
    import sample

    _env(monkeypatch, HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}")
    out = tmp_path / "c.png"
    assert sample.main(["--model", "tiny/sd1", "--prompt", "x", "--steps", "2", "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: tiny/sd1 is not in the Hugging Face cache")
    assert "cannot be reached (ConnectError)" in lines[0] and not out.exists()


def test_train_cli_by_repo_id_records_the_commit_then_runs_offline(hub, tmp_path):
    """train.py --model owner/name through the stand-in Hub: the commit goes into config.json and the LoRA;
    the same id again with HF_HUB_OFFLINE=1 trains from the cache without one request."""
    from PIL import Image

    from dreambooth_min.formats.lora_file import load_lora

    (tmp_path / "imgs").mkdir()
    for i in range(2):
        Image.new("RGB", (40, 40), (60 * i, 120, 200)).save(tmp_path / "imgs" / f"{i}.png")
    env = {k: v for k, v in os.environ.items() if k not in CLEARED} | {"HF_ENDPOINT": hub.url,
                                                                       "HF_HOME": str(tmp_path / "cli-hf")}
    args = [sys.executable, str(ROOT / "train.py"), "--images", "imgs", "--model", "tiny/sd1", "--revision", "old",
            "--resolution", "32", "--no-prior", "--steps", "2", "--validate-every", "0"]
    r = subprocess.run(args + ["--output", "a"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    resolved = json.loads((tmp_path / "a" / "config.json").read_text())["resolved"]
    assert resolved["source"] == {"repo_id": "tiny/sd1", "revision": hub.sha_old, "file": None}
    _, meta = load_lora(tmp_path / "a" / "lora.safetensors")
    assert meta["ss_base_model_repo_id"] == "tiny/sd1" and meta["ss_base_model_revision"] == hub.sha_old
    n = len(hub.log)
    r = subprocess.run(args + ["--output", "b"], cwd=tmp_path, env=env | {"HF_HUB_OFFLINE": "1"}, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert len(hub.log) == n  # not one request
    assert (tmp_path / "a" / "lora.safetensors").read_bytes() == (tmp_path / "b" / "lora.safetensors").read_bytes()
