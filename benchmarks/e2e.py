"""End to end: the same DreamBooth-LoRA run by diffusers' own script and by our train.py, set-up included.

    python -m benchmarks.e2e [--steps 4] [--size 512] [--class-images 4] [--profile]
    python -m benchmarks.e2e --smoke          # tiny random model, 64 px, 2 steps (< 1 min; tests)

Both tools train on one random full-size SD 1.5 saved as a diffusers folder (built once, no download; the
tokenizer is dreambooth_min/tokenizer), the photos of data/dog, with prior preservation (1 instance + 1 class
image per step; the class images are pre-drawn synthetic PNGs in one folder that both read, so neither spends
time drawing them), rank 4 on to_q/to_k/to_v/to_out.0, lr 1e-4, fp32 on the CPU, no validation, no checkpoint.

diffusers' script is `examples/dreambooth/train_dreambooth_lora.py`, read from a git copy of diffusers
(`--diffusers-repo`, default $DIFFUSERS_REPO or ../diffusers: `git clone https://github.com/huggingface/diffusers`) or a file (`--diffusers-script`,
or $DIFFUSERS_DREAMBOOTH_SCRIPT), copied into the temporary work folder at run time (never into this
repository), and run unchanged. It imports torchvision only for four image transforms; torchvision is not
installed here, so the harness writes a stand-in `torchvision` package (PIL + torch: Resize, CenterCrop /
RandomCrop, ToTensor, Normalize) into the same temporary folder, and a runner that lets transformers and
diffusers find torchvision missing (their cached checks) before it puts the stand-in on sys.path and runs the
script as __main__ (else transformers would import parts of torchvision that the stand-in does not have).

Measured per tool, in a fresh process each: set-up (start until its progress bar shows step 0), the first
step, the following steps (s/step, from the arrival times of its tqdm updates), the whole run (start to
exit, final save included), and the peak resident memory of the process (its rusage max RSS from wait4).
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT_IN_REPO = "examples/dreambooth/train_dreambooth_lora.py"
# A clone of github.com/huggingface/diffusers (a work tree, or a bare git directory: the script is read with git show)
DEFAULT_DIFFUSERS_REPO = Path(os.environ.get("DIFFUSERS_REPO", "../diffusers"))
INSTANCE_PROMPT, CLASS_PROMPT = "a photo of sks dog", "a photo of dog"
# tqdm lines of the two training loops: ours is "training", diffusers' script "Steps"
PROGRESS = re.compile(r"(?:^|\s)(?:training|Steps):\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)")

TORCHVISION_STANDIN = {
    "__init__.py": '"""Stand-in written by benchmarks.e2e: torchvision is not installed here."""\n'
                   "from . import transforms  # noqa: F401\n",
    "transforms.py": '''"""The transforms diffusers' DreamBooth script uses, as torchvision defines them for PIL images."""
import enum

import torch
from PIL import Image


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


_PIL = {"nearest": Image.NEAREST, "nearest-exact": Image.NEAREST, "bilinear": Image.BILINEAR,
        "bicubic": Image.BICUBIC, "box": Image.BOX, "hamming": Image.HAMMING, "lanczos": Image.LANCZOS}


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x


class Resize:
    """An int size: the short side becomes `size`, the long one int(size * long / short)."""

    def __init__(self, size, interpolation=InterpolationMode.BILINEAR):
        self.size, self.interpolation = size, interpolation

    def __call__(self, img):
        w, h = img.size
        short, long = min(w, h), max(w, h)
        s, l = self.size, int(self.size * long / short)
        return img.resize((s, l) if w <= h else (l, s), _PIL[self.interpolation.value])


def _crop(img, top, left, size):
    return img.crop((left, top, left + size, top + size))


class CenterCrop:
    def __init__(self, size):
        self.size = size

    def __call__(self, img):
        w, h = img.size
        return _crop(img, int(round((h - self.size) / 2.0)), int(round((w - self.size) / 2.0)), self.size)


class RandomCrop:
    def __init__(self, size):
        self.size = size

    def __call__(self, img):
        w, h = img.size
        top = int(torch.randint(0, h - self.size + 1, size=(1,)).item())
        left = int(torch.randint(0, w - self.size + 1, size=(1,)).item())
        return _crop(img, top, left, self.size)


class ToTensor:
    """8-bit RGB HWC -> float CHW in [0, 1]."""

    def __call__(self, img):
        x = torch.frombuffer(bytearray(img.convert("RGB").tobytes()), dtype=torch.uint8)
        return x.view(img.size[1], img.size[0], 3).permute(2, 0, 1).float().div(255)


class Normalize:
    def __init__(self, mean, std):
        self.mean, self.std = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]

    def __call__(self, x):
        return (x - self.mean) / self.std
'''}

RUNNER = '''"""Runs diffusers' script with the torchvision stand-in beside it (written by benchmarks.e2e)."""
import runpy
import sys
from pathlib import Path

import diffusers.utils.import_utils  # noqa: F401  (notes torchvision as missing, once)
from transformers.utils.import_utils import is_torchvision_available

is_torchvision_available()  # cached as False before the stand-in becomes importable
here = Path(__file__).resolve().parent
sys.path.insert(0, str(here / "standin"))
sys.argv[0] = str(here / "train_dreambooth_lora.py")
runpy.run_path(sys.argv[0], run_name="__main__")
'''


# ---------------------------------------------------------------------------------------------------
# Inputs: diffusers' script, the model folder, photos, class images

def find_script(script=None, repo=None):
    """The text of diffusers' train_dreambooth_lora.py and where it came from, or (None, why not)."""
    script = script or os.environ.get("DIFFUSERS_DREAMBOOTH_SCRIPT")
    if script:
        return (Path(script).read_text(), str(script)) if Path(script).is_file() else (None, f"{script} not found")
    repo = Path(repo) if repo else DEFAULT_DIFFUSERS_REPO
    if (repo / SCRIPT_IN_REPO).is_file():  # a checkout with a work tree
        return (repo / SCRIPT_IN_REPO).read_text(), str(repo / SCRIPT_IN_REPO)
    if not repo.exists():
        return None, f"no diffusers git copy at {repo} (give --diffusers-repo or --diffusers-script)"
    git = ["git", "-C", str(repo)]
    out = subprocess.run(git + ["show", f"HEAD:{SCRIPT_IN_REPO}"], capture_output=True, text=True)
    if out.returncode:
        return None, f"{repo}: {out.stderr.strip()[:200]}"
    commit = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    return out.stdout, f"github:huggingface/diffusers@{commit[:12]}:{SCRIPT_IN_REPO}"


def write_standin(folder):
    """The torchvision stand-in package in `folder` (put first on the script's PYTHONPATH)."""
    pkg = Path(folder) / "torchvision"
    pkg.mkdir(parents=True, exist_ok=True)
    for name, text in TORCHVISION_STANDIN.items():
        (pkg / name).write_text(text)
    return Path(folder)


def make_model_folder(path, smoke):
    """A random SD 1.5 (full size, or the tests' tiny one) as a diffusers folder; built once and reused."""
    path = Path(path)
    if (path / "model_index.json").exists():
        return path
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from benchmarks.cpu import UNET_SD15, VAE_SD15

    tok = ROOT / "dreambooth_min" / "tokenizer"
    if smoke:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny import make_pipeline
        pipe = make_pipeline("sd1")
    else:
        torch.manual_seed(0)  # diffusers' and transformers' own initialisation, as benchmarks.cpu
        text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                            num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768))
        scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  skip_prk_steps=True, steps_offset=1)  # SD 1.5's own
        pipe = StableDiffusionPipeline(
            vae=AutoencoderKL(**VAE_SD15), text_encoder=text, unet=UNet2DConditionModel(**UNET_SD15),
            tokenizer=CLIPTokenizer(str(tok / "vocab.json"), str(tok / "merges.txt"), model_max_length=77),
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    pipe.save_pretrained(partial, safe_serialization=True)
    partial.rename(path)  # whole or absent: an interrupted build is not reused
    return path


def copy_photos(src, dst):
    """The image files of `src` alone: diffusers' dataset opens every file of its folder as an image."""
    from dreambooth_min.formats.images import find_images

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for p in find_images(src):
        shutil.copyfile(p, dst / p.name)
    return dst


def make_class_images(folder, n, size, seed=0):
    """n smooth random RGB PNGs named as ours draws them (0000.png, ...); diffusers' script uses any files."""
    import torch
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        x = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=g), size=(size, size), mode="bilinear")
        rgb = (x[0].permute(1, 2, 0) * 255).round().to(torch.uint8).contiguous()
        Image.frombytes("RGB", (size, size), rgb.numpy().tobytes()).save(folder / f"{i:04d}.png")
    return folder


# ---------------------------------------------------------------------------------------------------
# Running one tool

@dataclass
class Run:
    """What one tool's run measured: seconds from its start, and its peak resident memory in bytes."""
    tool: str
    wall: float = 0.0
    peak_rss: int = 0
    returncode: int = None
    steps_at: dict = field(default_factory=dict)  # step k -> seconds from start when its bar first showed k
    total_steps: int = 0
    tail: str = ""

    @property
    def setup(self):
        return self.steps_at.get(0)

    @property
    def first_step(self):
        return self.steps_at[1] - self.steps_at[0] if {0, 1} <= self.steps_at.keys() else None

    @property
    def per_step(self):
        """Mean seconds of the steps after the first (the first also pays one-off allocations); with one
        step, that step."""
        n = self.total_steps
        if n >= 2 and {1, n} <= self.steps_at.keys():
            return (self.steps_at[n] - self.steps_at[1]) / (n - 1)
        return self.first_step


def progress_times(chunks):
    """{step: first arrival time} and the total from tqdm updates [(time, text)] (lines split at \\r or \\n)."""
    seen, total = {}, 0
    for t, text in chunks:
        for m in PROGRESS.finditer(text):
            k, total = int(m.group(1)), int(m.group(2))
            seen.setdefault(k, t)
    return seen, total


def run_tool(tool, cmd, env, cwd, log_path, echo=False):
    """Run `cmd`, timestamp its output as it arrives, and take its peak RSS from wait4 (max RSS, KiB)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    chunks, buf = [], bytearray()

    def read():
        with open(log_path, "wb") as log:
            while data := os.read(proc.stdout.fileno(), 65536):
                now = time.perf_counter() - start
                log.write(data)
                if echo:
                    sys.stderr.buffer.write(data)
                    sys.stderr.flush()
                buf.extend(data)
                *done, rest = re.split(rb"[\r\n]", bytes(buf))
                chunks.extend((now, d.decode(errors="replace")) for d in done if d)
                # tqdm ends a bar with the \r of its next one: read the unfinished line now too (first time counts)
                chunks.append((now, rest.decode(errors="replace")))
                buf[:] = rest

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join()
    chunks.append((wall, buf.decode(errors="replace")))
    run = Run(tool, wall, usage.ru_maxrss * 1024, proc.returncode)
    run.steps_at, run.total_steps = progress_times(chunks)
    run.tail = "\n".join(text for _, text in chunks[-25:])
    return run


def child_env(extra_path=()):
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=os.pathsep.join([*map(str, extra_path), str(ROOT)]))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env | {"CUDA_VISIBLE_DEVICES": ""}  # the CPU for both, also where a GPU exists


def ours_command(a, model, photos, class_dir, out):
    return [sys.executable, str(ROOT / "train.py"), "--images", str(photos), "--class-noun", "dog",
            "--prompt", INSTANCE_PROMPT, "--class-prompt", CLASS_PROMPT, "--model", str(model),
            "--resolution", str(a.size), "--num-class-images", str(a.class_images), "--class-dir", str(class_dir),
            "--steps", str(a.steps), "--rank", "4", "--lr", "1e-4", "--batch-size", "1", "--validate-every", "0",
            "--save-every", "0", "--seed", "0", "--device", "cpu", "--precision", "fp32", "--output", str(out)]


def diffusers_command(a, script, model, photos, class_dir, out):
    return [sys.executable, str(script), "--pretrained_model_name_or_path", str(model),
            "--instance_data_dir", str(photos), "--class_data_dir", str(class_dir), "--with_prior_preservation",
            "--prior_loss_weight", "1.0", "--instance_prompt", INSTANCE_PROMPT, "--class_prompt", CLASS_PROMPT,
            "--num_class_images", str(a.class_images), "--resolution", str(a.size), "--train_batch_size", "1",
            "--max_train_steps", str(a.steps), "--rank", "4", "--learning_rate", "1e-4", "--lr_scheduler",
            "constant", "--lr_warmup_steps", "0", "--checkpointing_steps", "1000000000", "--seed", "0",
            "--mixed_precision", "no", "--output_dir", str(out)]


# ---------------------------------------------------------------------------------------------------
# Table

def _f(x, fmt="{:.1f}"):
    return "-" if x is None else fmt.format(x)


def _ratio(a, b):
    return None if a is None or not b else a / b


def table(runs):
    """Markdown: one row per tool, and ours / diffusers when both ran."""
    rows = ["| | set-up s | first step s | s/step | whole run s | peak RSS GiB |", "| --- | --- | --- | --- | --- | --- |"]
    for r in runs.values():
        rows.append(f"| {r.tool} | {_f(r.setup)} | {_f(r.first_step)} | {_f(r.per_step, '{:.2f}')} | {_f(r.wall)} "
                    f"| {_f(r.peak_rss / 2**30, '{:.2f}')} |")
    if {"ours", "diffusers"} <= runs.keys():
        o, d = runs["ours"], runs["diffusers"]
        cells = [_ratio(getattr(o, k), getattr(d, k)) for k in ("setup", "first_step", "per_step", "wall", "peak_rss")]
        rows.append("| ratio ours/diffusers | " + " | ".join(_f(c, "{:.2f}x") for c in cells) + " |")
    return "\n".join(rows)


def loadavg():
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


# ---------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--class-images", type=int, default=4, help="pre-drawn class images (both tools)")
    p.add_argument("--tools", default="diffusers,ours", help="which to run, in this order")
    p.add_argument("--work", default="", help="work folder (default: a new temporary one, removed after); "
                   "the model folder is kept in --model-cache")
    p.add_argument("--model-cache", default=str(Path(tempfile.gettempdir()) / "dreambooth_min_e2e_models"))
    p.add_argument("--diffusers-script", default="", help="diffusers' train_dreambooth_lora.py")
    p.add_argument("--diffusers-repo", default="", help=f"a git copy of diffusers (default {DEFAULT_DIFFUSERS_REPO})")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for both (0: torch's default)")
    p.add_argument("--profile", action="store_true", help="also profile our UNet step (benchmarks.profile)")
    p.add_argument("--echo", action="store_true", help="show the tools' output as they run")
    p.add_argument("--json", default="", help="also write the measurements here")
    p.add_argument("--smoke", action="store_true", help="tiny random model, 64 px, 2 steps, 2 class images")
    a = p.parse_args(argv)
    if a.smoke:
        a.size, a.steps, a.class_images = 64, 2, 2
    return a


def prepare_inputs(a, work):
    """(model folder, photos, class folder, diffusers' script copied into work or None, why not)."""
    model = make_model_folder(Path(a.model_cache) / ("tiny-sd1" if a.smoke else "random-sd15"), a.smoke)
    photos = copy_photos(ROOT / "data" / "dog", work / "photos")
    class_dir = make_class_images(work / "class_images", a.class_images, a.size)
    script, source = None, None
    if "diffusers" in a.tools:
        text, source = find_script(a.diffusers_script or None, a.diffusers_repo or None)
        if text is not None:
            script = work / "diffusers" / "train_dreambooth_lora.py"
            script.parent.mkdir(parents=True, exist_ok=True)
            script.write_text(text)
            write_standin(script.parent / "standin")
            script = script.with_name("run.py")
            script.write_text(RUNNER)
    return model, photos, class_dir, script, source


def run_all(a, work):
    """{tool: Run} for the tools asked for (diffusers' skipped, with a note, when its script is not found)."""
    model, photos, class_dir, script, source = prepare_inputs(a, work)
    env = child_env()
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
    runs, notes = {}, []
    for tool in a.tools.split(","):
        if tool == "diffusers" and script is None:
            notes.append(f"diffusers' script skipped: {source}")
            continue
        out = work / f"out_{tool}"
        shutil.rmtree(out, ignore_errors=True)  # a fresh run each time (ours would refuse a finished one)
        if tool == "ours":
            cmd, tool_env = ours_command(a, model, photos, class_dir, out), env
        else:
            notes.append(f"diffusers' script: {source} (torchvision: stand-in in {script.parent / 'standin'})")
            cmd = diffusers_command(a, script, model, photos, class_dir, out)
            tool_env = env
        print(f"running {tool} (load {loadavg()}) ...", file=sys.stderr, flush=True)
        runs[tool] = run = run_tool(tool, cmd, tool_env, ROOT, work / f"{tool}.log", a.echo)
        if run.returncode:
            raise SystemExit(f"{tool} failed (exit {run.returncode}):\n{run.tail[-4000:]}")
        run.lora = str(next(iter(sorted(out.rglob("*lora*.safetensors"))), ""))
    return runs, notes


def main(argv=None):
    a = parse_args(argv)
    import torch

    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="dreambooth_min_e2e_"))
    work.mkdir(parents=True, exist_ok=True)
    head = (f"e2e: {a.steps} steps, {a.size} px, prior preservation (1 + 1 image per step, {a.class_images} class "
            f"images pre-drawn), rank 4, fp32 CPU, torch {torch.__version__}, {os.cpu_count()} CPUs, "
            f"threads {a.threads or torch.get_num_threads()}, load {loadavg()} at start")
    try:
        runs, notes = run_all(a, work)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    print(head + f", {loadavg()} at end")
    for n in notes:
        print(n)
    print()
    print(table(runs))
    if a.json:
        Path(a.json).write_text(json.dumps({k: vars(v) | {"setup_s": v.setup, "first_step_s": v.first_step,
                                                            "per_step_s": v.per_step} for k, v in runs.items()},
                                           indent=1))
    if a.profile:
        from benchmarks import profile
        profile.main(["--smoke"] if a.smoke else ["--size", str(a.size)])
    return runs


if __name__ == "__main__":
    main()
