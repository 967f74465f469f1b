"""The DreamBooth part of one seed: class images drawn by the frozen toy model, then each case through
`python train.py`, exactly as a user would run it."""
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tqdm.auto import tqdm

from . import world
from .cases import CLASS_PROMPT, TRAIN_PROMPT
from .measure import noise_seed

ROOT = Path(__file__).resolve().parents[2]  # the project: train.py lives here


def class_images(s, seed, model_path, folder):
    """The frozen model's own "a photo of a circle" pictures, drawn with this project's prior.py exactly as
    train.py would draw them, but with the sampler steps and guidance of every measurement; train.py reuses
    them. The folder name holds those settings: other settings never reuse these pictures."""
    from dreambooth_min import load
    from dreambooth_min.run.prior import ensure_class_images

    folder = folder / f"class_images_steps{s.sample_steps}_guidance{s.guidance:g}"
    ensure_class_images(load(model_path), folder, CLASS_PROMPT, s.class_images, world.SIZE, s.sample_steps,
                        guidance=s.guidance, seed=noise_seed(seed, 5_000))
    return folder


def train_command(s, seed, model_path, subject, output, case, class_dir=None):
    """The `python train.py ...` command line of one case (cases.Case) on seed `seed`; `subject` the folder of
    the case's photos (a masked case's masks are in `<subject>_masks/`, the same names)."""
    cmd = [sys.executable, str(ROOT / "train.py"), "--images", str(subject), "--model", str(model_path),
           "--class-noun", "circle", "--prompt", TRAIN_PROMPT, "--class-prompt", CLASS_PROMPT,
           "--resolution", str(world.SIZE), "--rank", str(s.rank), "--lora-targets", s.lora_targets,
           "--lr", str(s.lr), "--steps", str(s.db_steps), "--batch-size", str(s.db_batch),
           "--validate-every", "0", "--seed", str(seed), "--device", "cpu", "--output", str(output)]
    cmd += ["--save-every", str(s.curve_every), "--keep-checkpoints", "1000"] if case.curve else ["--save-every", "0"]
    if s.train_text_encoder:
        cmd.append("--train-text-encoder")
    if case.masked:
        cmd += ["--masks", f"{subject}_masks"]
    if not case.prior:
        return cmd + ["--no-prior"] + list(case.args)
    return cmd + ["--prior-weight", str(s.prior_weight), "--num-class-images", str(s.class_images),
                  "--class-dir", str(class_dir), "--class-steps", str(s.sample_steps)] + list(case.args)


def photos_digest(cmd):
    """SHA-256 of the photos and masks a train.py command reads (--images, --masks): a finished run is reused
    only for the same pictures, not just the same command line (world.py may have drawn other ones)."""
    digest = hashlib.sha256()
    for flag in ("--images", "--masks"):
        if flag in cmd:
            for path in sorted(Path(cmd[cmd.index(flag) + 1]).iterdir()):
                digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def run_train(cmd, threads):
    """Run train.py (its own progress bar shows) and return the LoRA it wrote. A finished run of the same
    command on the same photos (an earlier call with the same --out) is reused; another run in its folder
    is replaced.
    Threads as ours; idle OpenMP threads sleep (shared cores)."""
    from dreambooth_min.watch.report import write_text_atomic

    output = Path(cmd[cmd.index("--output") + 1])
    lora, stamp = output / "lora.safetensors", output / "toyworld_command.txt"
    line = " ".join(cmd[1:]) + "\n" + photos_digest(cmd)
    if lora.exists() and stamp.exists() and stamp.read_text() == line:
        tqdm.write(f"reusing {lora} (same train.py command and photos)")
        return lora
    if output.exists():
        tqdm.write(f"replacing the earlier run in {output} (another command, other photos, or unfinished)")
        shutil.rmtree(output)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    done = subprocess.run(cmd, cwd=ROOT, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"train.py failed with exit status {done.returncode}: {' '.join(cmd[1:])}")
    if not lora.exists():
        raise RuntimeError(f"train.py finished without writing {lora}")
    write_text_atomic(stamp, line)
    return lora


def load_model(model_path, lora=None, embedding=None, tokens="<s0><s1>"):
    """The saved toy model, with a LoRA merged into it (scale 1) when given, and --pivotal's new tokens:
    `embedding` an embedding file or a checkpoint's state.pt (whose vectors are `tokens`')."""
    import torch

    from dreambooth_min import load
    from dreambooth_min.formats.lora_apply import apply_lora
    from dreambooth_min.formats.lora_file import load_lora
    from dreambooth_min.run.pivotal import add_tokens, split_tokens, use_embedding

    sd = load(model_path)
    if lora is not None:
        apply_lora(sd.unet, sd.text_encoder, load_lora(lora)[0], scale=1.0)
    if embedding is not None and Path(embedding).suffix == ".pt":
        vectors = next(iter(torch.load(embedding, weights_only=False)["embeddings"].values()))
        add_tokens(sd.tokenizer, sd.text_encoder, split_tokens(tokens), vectors)
    elif embedding is not None:
        use_embedding(sd, embedding)
    return sd
