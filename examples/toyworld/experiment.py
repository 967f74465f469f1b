"""The experiment: world -> pretrained toy model -> DreamBooth through train.py (with and without prior
preservation) -> the same seeds sampled from every model -> detectors -> results.json and figures.
"""
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import detect, world
from .model import ModelSizes, pretrain

ROOT = Path(__file__).resolve().parents[2]  # the project: train.py lives here
INSTANCE_PROMPT, CLASS_PROMPT, RED_PROMPT = "a photo of sks circle", "a photo of a circle", "a photo of a red circle"
MODELS = ("pretrained", "no_prior", "prior")


@dataclass
class Settings:
    seed: int = 0
    world_images: int = 6000
    texture_images: int = 4000
    vae_steps: int = 600
    decoder_steps: int = 200
    unet_steps: int = 1700
    batch: int = 32
    model: ModelSizes = field(default_factory=ModelSizes)
    subject_images: int = 4
    # DreamBooth, passed to train.py
    db_steps: int = 300
    db_batch: int = 4
    rank: int = 8
    lr: float = 2e-3
    lora_targets: str = "to_q,to_k,to_v,to_out.0,proj_in,proj_out,ff.net.0.proj,ff.net.2"
    train_text_encoder: bool = True
    prior_weight: float = 1.0
    class_images: int = 64
    # measurement
    samples: int = 64
    sample_steps: int = 25
    guidance: float = 4.0
    detector_images: int = 600
    threads: int = 2


def tiny_settings(seed=0):
    """A few seconds per phase: the pipeline goes through, the numbers mean nothing."""
    return Settings(seed=seed, world_images=96, texture_images=32, vae_steps=8, decoder_steps=2, unet_steps=12,
                    batch=8, model=ModelSizes(vae_channels=(8, 8, 16), unet_channels=(16, 16), unet_heads=(2, 2),
                                              text_width=32, groups=4),
                    db_steps=4, db_batch=2, rank=2, class_images=4, samples=4, sample_steps=4,
                    detector_images=48, threads=1)


class Timer:
    """Wall seconds per phase, in the order run."""

    def __init__(self):
        self.seconds = {}

    def __call__(self, name):
        timer = self

        class Phase:
            def __enter__(self):
                self.start = time.time()
                tqdm.write(f"== {name}")

            def __exit__(self, *exc):
                timer.seconds[name] = round(time.time() - self.start, 1)

        return Phase()


def make_data(s, out):
    """World, autoencoder textures and subject pictures; the 4 subject pictures go to out/subject/."""
    images, captions, colours, _ = world.make_world(s.world_images, s.seed)
    textures = world.make_textures(s.texture_images, s.seed)
    subject = world.make_subject(s.subject_images, s.seed)
    folder = out / "subject"
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(subject):
        im.save(folder / f"{i:02d}.png")
    return images, captions, colours, textures, subject


def detector_check(s, vae):
    """(prototypes, accuracy): the nearest-colour detector calibrated on autoencoded pictures of one seed,
    and every detector's accuracy on held-out pictures of another, as rendered and as autoencoded."""
    n, m = s.detector_images, max(8, s.detector_images // 8)
    cal_images, _, cal_colours, _ = world.make_world(n, s.seed + 20_000)
    rec = autoencode(vae, cal_images + world.make_subject(m, s.seed + 20_000))
    prototypes = detect.calibrate(rec[:n], cal_colours, rec[n:])
    test_images, _, test_colours, _ = world.make_world(n, s.seed + 10_000)
    test_subject = world.make_subject(m, s.seed + 10_000)
    rec = autoencode(vae, test_images + test_subject)
    result = {"rendered": detect.detector_accuracy(test_images, test_colours, test_subject),
              "autoencoded": detect.detector_accuracy(rec[:n], test_colours, rec[n:]),
              "nearest_rendered": detect.nearest_accuracy(test_images, test_colours, test_subject, prototypes),
              "nearest_autoencoded": detect.nearest_accuracy(rec[:n], test_colours, rec[n:], prototypes),
              "prototypes": prototypes}
    return prototypes, result


@torch.no_grad()
def autoencode(vae, images):
    from PIL import Image

    mean, _ = vae.encode(world.to_tensor(images))
    x = ((vae.decode(mean).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    return [Image.fromarray(a.numpy()) for a in x]


def save_model(out, unet, vae, text_encoder):
    """The toy model as an ordinary diffusers folder: what load(), train.py and sample.py read."""
    from dreambooth_min.export import save_diffusers_folder

    return save_diffusers_folder(out / "model", unet, vae, text_encoder, "sd1", "epsilon",
                                 sample_size=world.SIZE // 2 ** (len(vae.config.block_out_channels) - 1))


def class_images(s, model_path, out):
    """The frozen model's own "a photo of a circle" pictures, drawn with this project's prior.py exactly as
    train.py would draw them, but with the guidance used for every measurement; train.py reuses them."""
    from dreambooth_min import load
    from dreambooth_min.prior import ensure_class_images

    folder = out / "class_images"
    ensure_class_images(load(model_path), folder, CLASS_PROMPT, s.class_images, world.SIZE, s.sample_steps,
                        guidance=s.guidance, seed=s.seed + 5_000)
    return folder


def train_command(s, model_path, out, name, class_dir=None):
    """The `python train.py ...` command line of one DreamBooth run (None class_dir: no prior preservation)."""
    cmd = [sys.executable, str(ROOT / "train.py"), "--images", str(out / "subject"), "--model", str(model_path),
           "--class-noun", "circle", "--prompt", INSTANCE_PROMPT, "--class-prompt", CLASS_PROMPT,
           "--resolution", str(world.SIZE), "--rank", str(s.rank), "--lora-targets", s.lora_targets,
           "--lr", str(s.lr), "--steps", str(s.db_steps), "--batch-size", str(s.db_batch),
           "--validate-every", "0", "--save-every", "0", "--seed", str(s.seed), "--device", "cpu",
           "--output", str(out / "runs" / name)]
    if s.train_text_encoder:
        cmd.append("--train-text-encoder")
    if class_dir is None:
        return cmd + ["--no-prior"]
    return cmd + ["--prior-weight", str(s.prior_weight), "--num-class-images", str(s.class_images),
                  "--class-dir", str(class_dir), "--class-steps", str(s.sample_steps)]


def run_train(cmd, threads):
    """Run train.py; its own progress bar shows. Threads as ours; idle OpenMP threads sleep (shared cores)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    done = subprocess.run(cmd, cwd=ROOT, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"train.py failed with exit status {done.returncode}: {' '.join(cmd)}")
    lora = Path(cmd[cmd.index("--output") + 1]) / "lora.safetensors"
    if not lora.exists():
        raise RuntimeError(f"train.py finished without writing {lora}")
    return lora


def load_model(model_path, lora=None):
    """The saved toy model, with a LoRA merged into it (scale 1) when given."""
    from dreambooth_min import load
    from dreambooth_min.lora_file import apply_lora, load_lora

    sd = load(model_path)
    if lora is not None:
        apply_lora(sd.unet, sd.text_encoder, load_lora(lora)[0], scale=1.0)
    return sd


def sample_prompts(s, sd, prompts, bar):
    """{prompt: [PIL images]}: image i of every prompt and every model starts from the same noise (seed + i)."""
    from dreambooth_min.sampling import generate

    found = {}
    for prompt in prompts:
        found[prompt] = generate(sd, prompt, num_images=s.samples, steps=s.sample_steps, guidance=s.guidance,
                                 seed=s.seed + 1_000, height=world.SIZE, width=world.SIZE, progress=False,
                                 batch_size=64)
        bar.update(1)
    return found


def measure(samples, prototypes):
    """The numbers of one model from its samples (detectors: see detect.py). fidelity, drift and red_kept
    use the calibrated nearest-colour detector; the *_magenta ones the stricter pixel-hue detector."""
    subject, circle, red = samples[INSTANCE_PROMPT], samples[CLASS_PROMPT], samples[RED_PROMPT]
    near = lambda images: [detect.nearest(im, prototypes) for im in images]
    return {"fidelity": detect.rate(n == "subject" for n in near(subject)),
            "drift": detect.rate(n == "subject" for n in near(circle)),
            "red_kept": detect.rate(n == "red" for n in near(red)),
            "fidelity_magenta_stripes": detect.rate(map(detect.shows_subject, subject)),
            "drift_magenta": detect.rate(map(detect.subject_sign, circle)),
            "red_kept_hue": detect.rate(detect.colour(im) == "red" for im in red),
            "circle_colours": _counts(near(circle))}


def _counts(names):
    found = {}
    for n in names:
        found[n] = found.get(n, 0) + 1
    return dict(sorted(found.items()))


def colour_accuracy(s, sd, bar, prototypes):
    """Pretrained model only: share of "a photo of a {colour} {shape}" samples in that colour."""
    from dreambooth_min.sampling import generate

    hits, n = 0, max(1, s.samples // 8)
    for colour in world.COLOURS:
        for shape in world.SHAPES:
            images = generate(sd, f"a photo of a {colour} {shape}", num_images=n, steps=s.sample_steps,
                              guidance=s.guidance, seed=s.seed + 2_000, height=world.SIZE, width=world.SIZE,
                              progress=False, batch_size=64)
            hits += sum(detect.nearest(im, prototypes) == colour for im in images)
        bar.update(1)
    return hits / (n * len(world.COLOURS) * len(world.SHAPES))


def _font(size):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def figure(all_samples, path, per_cell=16, zoom=2):
    """Rows: the three prompts; columns: the three models; each cell the first `per_cell` samples."""
    from PIL import Image, ImageDraw

    from dreambooth_min.sampling import image_grid

    titles = {"pretrained": "pretrained", "no_prior": "DreamBooth, no prior", "prior": "DreamBooth + prior"}
    prompts = (INSTANCE_PROMPT, CLASS_PROMPT, RED_PROMPT)
    cells = {(m, p): image_grid(all_samples[m][p][:per_cell]) for m in all_samples for p in prompts}
    w, h = next(iter(cells.values())).size
    w, h, gap, left, top = w * zoom, h * zoom, 8, 170, 28
    models = [m for m in MODELS if m in all_samples]
    canvas = Image.new("RGB", (left + len(models) * (w + gap), top + len(prompts) * (h + gap)), (255, 255, 255))
    draw, font = ImageDraw.Draw(canvas), _font(14)
    for j, m in enumerate(models):
        draw.text((left + j * (w + gap) + 4, 6), titles[m], fill=(0, 0, 0), font=font)
    for i, p in enumerate(prompts):
        y = top + i * (h + gap)
        draw.text((6, y + h // 2 - 8), f'"{p}"', fill=(0, 0, 0), font=_font(12))
        for j, m in enumerate(models):
            canvas.paste(cells[(m, p)].resize((w, h), Image.Resampling.NEAREST), (left + j * (w + gap), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.quantize(256).save(path, optimize=True)  # a palette keeps the README figure small (< 300 KB)
    return path


def save_grids(all_samples, folder):
    """Every sample, one grid per model and prompt: grids/<model>/<prompt>.png."""
    from dreambooth_min.sampling import image_grid

    for m, by_prompt in all_samples.items():
        (folder / m).mkdir(parents=True, exist_ok=True)
        for p, images in by_prompt.items():
            image_grid(images).save(folder / m / (p.replace(" ", "_") + ".png"))


def goals(results):
    """The issue's targets, each true or false."""
    return {"prior: drift <= 10%": results["prior"]["drift"] <= 0.10,
            "prior: red kept >= 70%": results["prior"]["red_kept"] >= 0.70,
            "no prior: drift >= 50%": results["no_prior"]["drift"] >= 0.50,
            "no prior: fidelity >= 60%": results["no_prior"]["fidelity"] >= 0.60,
            "prior: fidelity >= 60%": results["prior"]["fidelity"] >= 0.60}


def sample_all(s, model_path, loras, prototypes):
    """({model: {prompt: images}}, {model: numbers}) for the pretrained model and each LoRA on it."""
    prompts = (INSTANCE_PROMPT, CLASS_PROMPT, RED_PROMPT)
    bar = tqdm(total=3 * len(prompts) + len(world.COLOURS), desc="sampling", unit="prompt")
    samples, results = {}, {}
    for name in MODELS:
        sd = load_model(model_path, loras.get(name))
        samples[name] = sample_prompts(s, sd, prompts, bar)
        results[name] = measure(samples[name], prototypes)
        if name == "pretrained":
            results[name]["colour_accuracy"] = colour_accuracy(s, sd, bar, prototypes)
    bar.close()
    return samples, results


def pretrained_model(s, out, data):
    """Pretrain and save the toy model; returns (its folder, its VAE)."""
    images, captions, _, textures, _ = data
    steps = (s.vae_steps, s.decoder_steps, s.unet_steps, s.batch)
    unet, vae, text_encoder, _ = pretrain(images, textures, captions, s.model, steps, s.seed)
    return save_model(out, unet, vae, text_encoder), vae


def run(s, out, model_path=None):
    """The whole experiment into folder `out`; returns the results dict (also out/results.json).
    `model_path`: reuse a toy model saved by an earlier run instead of pretraining one."""
    from dreambooth_min import load
    from dreambooth_min.report import write_text_atomic

    torch.set_num_threads(s.threads)
    out, timer, start = Path(out), Timer(), time.time()
    with timer("world"):
        data = make_data(s, out)
    with timer("pretrain"):
        model_path, vae = pretrained_model(s, out, data) if model_path is None else (Path(model_path), None)
    vae = vae or load(model_path).vae
    prototypes, detectors = detector_check(s, vae)
    with timer("class_images"):
        class_dir = class_images(s, model_path, out)
    loras = {}
    with timer("dreambooth_no_prior"):
        loras["no_prior"] = run_train(train_command(s, model_path, out, "no_prior"), s.threads)
    with timer("dreambooth_prior"):
        loras["prior"] = run_train(train_command(s, model_path, out, "prior", class_dir), s.threads)
    with timer("sampling"):
        samples, results = sample_all(s, model_path, loras, prototypes)
    figure(samples, out / "figure.png")
    save_grids(samples, out / "grids")
    timer.seconds["total"] = round(time.time() - start, 1)
    results.update(goals=goals(results), detector_accuracy=detectors, wall_seconds=timer.seconds,
                   settings=asdict(s), model=str(model_path),
                   prompts={"fidelity": INSTANCE_PROMPT, "drift": CLASS_PROMPT, "red_kept": RED_PROMPT},
                   train_commands={k: " ".join(train_command(s, model_path, out, k, class_dir if k == "prior" else None)[1:])
                                   for k in loras})
    write_text_atomic(out / "results.json", json.dumps(results, indent=2))
    return results


def table(results):
    """The results as a markdown table (for the README)."""
    rows = ["| model | fidelity: \"sks circle\" shows the subject | drift: \"a circle\" looks like the subject "
            "| \"a red circle\" still red |", "| --- | --- | --- | --- |"]
    names = {"pretrained": "pretrained", "no_prior": "DreamBooth LoRA, no prior preservation",
             "prior": "DreamBooth LoRA with prior preservation"}
    for m in MODELS:
        r = results[m]
        rows.append(f"| {names[m]} | {r['fidelity']:.0%} "
                    f"| {r['drift']:.0%} | {r['red_kept']:.0%} |")
    return "\n".join(rows)


def parse_args(argv=None):
    import argparse

    d = Settings()
    p = argparse.ArgumentParser(description="DreamBooth's two claims in a toy world, on a CPU (see examples/toyworld/).")
    p.add_argument("--out", required=True, help="folder for the model, runs, grids, figure.png and results.json")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the world, the training and the samples (default: %(default)s)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes and a few steps: checks the pipeline in seconds")
    p.add_argument("--model", help="reuse the toy model (out/model) of an earlier run instead of pretraining")
    p.add_argument("--threads", type=int, default=d.threads, help="CPU threads (default: %(default)s)")
    p.add_argument("--world-images", type=int, help=f"pictures in the world (default: {d.world_images})")
    p.add_argument("--unet-steps", type=int, help=f"denoiser pretraining steps (default: {d.unet_steps})")
    p.add_argument("--vae-steps", type=int, help=f"autoencoder steps (default: {d.vae_steps})")
    p.add_argument("--db-steps", type=int, help=f"DreamBooth steps of each train.py run (default: {d.db_steps})")
    p.add_argument("--rank", type=int, help=f"LoRA rank (default: {d.rank})")
    p.add_argument("--lr", type=float, help=f"LoRA learning rate (default: {d.lr})")
    p.add_argument("--lora-targets", help=f"UNet layers with LoRA (default: {d.lora_targets})")
    p.add_argument("--prior-weight", type=float, help=f"lambda of prior preservation (default: {d.prior_weight})")
    p.add_argument("--no-text-encoder", action="store_true", help="no LoRA on the text encoder")
    p.add_argument("--samples", type=int, help=f"samples per prompt and model (default: {d.samples})")
    p.add_argument("--guidance", type=float, help=f"classifier-free guidance scale (default: {d.guidance})")
    p.add_argument("--pivotal", action="store_true", help="instead: fidelity per step of pivotal tuning against plain "
                   "DreamBooth-LoRA (examples/toyworld/pivotal.py)")
    return p.parse_args(argv)


def settings_from_args(args):
    s = tiny_settings(args.seed) if args.tiny else Settings(seed=args.seed)
    if not args.tiny:
        s.threads = args.threads
    names = ("world_images", "unet_steps", "vae_steps", "db_steps", "rank", "lr", "lora_targets", "prior_weight",
             "samples", "guidance")
    for name in names:
        if getattr(args, name) is not None:
            setattr(s, name, getattr(args, name))
    if args.no_text_encoder:
        s.train_text_encoder = False
    return s


def main(argv=None):
    args = parse_args(argv)
    if args.pivotal:
        from .pivotal import main as pivotal_main

        return pivotal_main(settings_from_args(args), args.out, args.model)
    results = run(settings_from_args(args), args.out, args.model)
    print(table(results))
    print("wall seconds:", json.dumps(results["wall_seconds"]))
    print("goals:", json.dumps(results["goals"]) + ("  (--tiny: the pipeline went through; at tiny sizes the "
                                                    "numbers mean nothing)" if args.tiny else ""))
    print(f"figure: {Path(args.out) / 'figure.png'}; numbers: {Path(args.out) / 'results.json'}")
    return 0
