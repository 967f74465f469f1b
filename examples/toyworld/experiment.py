"""The experiment: world -> pretrained toy model (once; saved and reused) -> for each seed: DreamBooth
through train.py for each case (cases.py) -> the same noise sampled from every model -> detectors ->
results.json (every seed, and mean / min..max over seeds) and figure.png (the first seed).
"""
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import detect, world
from .cases import CASES, PROMPTS, goals, models, table_models
from .curves import curve, curve_summary
from .figure import figure, save_grids
from .finetune import ROOT, class_images, load_model, run_train, train_command
from .measure import background_table, goals_every_seed, sample_all, summary, table
from .model import ModelSizes, pretrain

PRETRAIN_FIELDS = ("seed", "world_images", "texture_images", "vae_steps", "decoder_steps", "unet_steps", "batch",
                   "model")  # what the saved model depends on: another value pretrains again


@dataclass
class Settings:
    seed: int = 0  # the world, the subject, pretraining and the detector's calibration
    seeds: int = 1  # DreamBooth runs, sampling and class images with seeds seed, seed + 1, ...
    cases: tuple = tuple(c.name for c in CASES)
    world_images: int = 6000
    texture_images: int = 7000
    vae_steps: int = 1800
    decoder_steps: int = 600
    unet_steps: int = 4000
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
    curve_every: int = 50  # checkpoint (and sample) every N steps in the cases with a curve (curves.py)
    curve_samples: int = 32  # samples per prompt at each checkpoint
    detector_images: int = 600
    threads: int = 2


def tiny_settings(seed=0, seeds=1):
    """A few seconds per phase: the pipeline goes through, the numbers mean nothing."""
    return Settings(seed=seed, seeds=seeds, world_images=96, texture_images=32, vae_steps=8, decoder_steps=2,
                    unet_steps=12, batch=8, model=ModelSizes(vae_channels=(8, 8, 16), unet_channels=(16, 16),
                                                             unet_heads=(2, 2), text_width=32, groups=4),
                    db_steps=4, db_batch=2, rank=2, class_images=4, samples=4, sample_steps=4,
                    curve_every=2, curve_samples=2, detector_images=48, threads=1)


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


def save_subject(s, out):
    """The subject's pictures (drawn from the world seed) where train.py reads them: out/subject/, and for the
    masked cases out/subject_busy/ (on the busy background) with their masks in out/subject_busy_masks/."""
    folders = [out / name for name in ("subject", "subject_busy", "subject_busy_masks")]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(world.make_subject(s.subject_images, s.seed)):
        im.save(folders[0] / f"{i:02d}.png")
    for i, (im, mask) in enumerate(world.make_subject_on_busy(s.subject_images, s.seed)):
        im.save(folders[1] / f"{i:02d}.png")
        mask.save(folders[2] / f"{i:02d}.png")


def detector_check(s, vae):
    """(prototypes, accuracy): the detector calibrated on pictures of one seed passed through the toy
    autoencoder (detect.calibrate: its only parameters), and its accuracy on held-out pictures of another
    seed, as rendered and as autoencoded. Made before, and independent of, any DreamBooth run."""
    n, m = s.detector_images, max(8, s.detector_images // 4)
    cal_images, _, cal_colours, _ = world.make_world(n, s.seed + 20_000)
    busy = [im for im, _ in world.make_subject_on_busy(m, s.seed + 20_000)]
    rec = autoencode(vae, cal_images + world.make_subject(m, s.seed + 20_000) + busy)
    prototypes = detect.calibrate(rec[:n], cal_colours, rec[n:n + m], rec[n + m:])
    test_images, _, test_colours, _ = world.make_world(n, s.seed + 10_000)
    test_subject = world.make_subject(m, s.seed + 10_000)
    test_busy = [im for im, _ in world.make_subject_on_busy(m, s.seed + 10_000)]
    rec = autoencode(vae, test_images + test_subject + test_busy)
    result = {"rendered": detect.accuracy(test_images, test_colours, test_subject, prototypes, test_busy),
              "autoencoded": detect.accuracy(rec[:n], test_colours, rec[n:n + m], prototypes, rec[n + m:]),
              "prototypes": prototypes, "calibration": {"n_world": n, "n_subject": m, "seed": s.seed + 20_000},
              "held_out_seed": s.seed + 10_000}
    return prototypes, result


@torch.no_grad()
def autoencode(vae, images):
    from PIL import Image

    mean, _ = vae.encode(world.to_tensor(images))
    x = ((vae.decode(mean).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    return [Image.fromarray(a.numpy()) for a in x]


def save_model(out, unet, vae, text_encoder):
    """The toy model as an ordinary diffusers folder: what load(), train.py and sample.py read."""
    from dreambooth_min.formats.export import save_diffusers_folder

    return save_diffusers_folder(out / "model", unet, vae, text_encoder, "sd1", "epsilon",
                                 sample_size=world.SIZE // 2 ** (len(vae.config.block_out_channels) - 1))


def pretrain_settings(s):
    return json.loads(json.dumps({k: v for k, v in asdict(s).items() if k in PRETRAIN_FIELDS}))


def saved_model(s, out):
    """out/model when an earlier call pretrained it with these settings (out/pretrain.json, written after the
    model), else None. A model from other settings is an error: pretraining again would replace it."""
    path, stamp = out / "model", out / "pretrain.json"
    if not (path / "model_index.json").exists() or not stamp.exists():
        return None
    if json.loads(stamp.read_text()) != pretrain_settings(s):
        raise SystemExit(f"error: {path} was pretrained with other settings ({stamp}); use another --out, or "
                         f"--model {path} to fine-tune it anyway")
    return path


def pretrained_model(s, out):
    """Pretrain and save the toy model (then out/pretrain.json, its settings); returns its folder."""
    from dreambooth_min.watch.report import write_text_atomic

    images, captions, _, _ = world.make_world(s.world_images, s.seed)
    textures = world.make_textures(s.texture_images, s.seed)
    steps = (s.vae_steps, s.decoder_steps, s.unet_steps, s.batch)
    unet, vae, text_encoder, _ = pretrain(images, textures, captions, s.model, steps, s.seed)
    path = save_model(out, unet, vae, text_encoder)
    write_text_atomic(out / "pretrain.json", json.dumps(pretrain_settings(s), indent=2))
    return path


def relative(text, out):
    """`text` with the --out folder's path and the project's written relative (results.json moves)."""
    return text.replace(f"{Path(out).resolve()}/", "").replace(f"{out}/", "").replace(f"{ROOT}/", "")


def run_seed(s, seed, out, model_path, prototypes):
    """The DreamBooth part with one seed, into out/seed_<seed>/: class images, each case through train.py,
    samples of every model, the curves. Returns (samples, numbers, wall seconds, train.py commands)."""
    folder, timer, cases = out / f"seed_{seed}", Timer(), models(s.cases)
    class_dir = None
    if any(c.prior for c in cases):
        with timer("class_images"):
            class_dir = class_images(s, seed, model_path, folder)
    runs, commands = {}, {}
    for case in cases[1:]:
        cmd = train_command(s, seed, model_path, out / case.subject, folder / "runs" / case.name, case, class_dir)
        commands[case.name] = relative(" ".join(cmd[1:]), out)
        with timer(f"dreambooth_{case.name}"):
            runs[case.name] = run_train(cmd, s.threads).parent

    def pipeline(case):
        run = runs.get(case.name)
        embedding = run / "embedding.safetensors" if run and case.token != "sks" else None
        return load_model(model_path, run and run / "lora.safetensors", embedding, case.token)

    with timer("sampling"):
        samples, results = sample_all(s, seed, cases, pipeline, prototypes)
    save_grids(samples, folder / "grids")
    results["goals"] = goals(results)
    with timer("curves"):
        results["curves"] = {c.name: curve(s, seed, c, model_path, runs[c.name], prototypes)
                             for c in cases[1:] if c.curve}
    return samples, results, timer.seconds, commands


def estimate_minutes(s, pretraining):
    """(pretraining, all seeds) in rough wall minutes on 2 cores: seconds per step of each phase of a
    default run on 2 quiet cores (measured: pretraining 1,059 s against 1,094 estimated; seed 0 with all six
    cases 438 s against 497), times the steps asked for."""
    pre = 0.18 * s.vae_steps + 0.15 * s.decoder_steps + 0.17 * s.unet_steps if pretraining else 0.0
    cases = models(s.cases)
    sampling = len(cases) * (0.0021 * s.samples * s.sample_steps * len(PROMPTS) + 1)
    training = sum((0.16 if c.prior else 0.13) * s.db_steps + 8 for c in cases[1:])
    curves = sum(s.db_steps // max(1, s.curve_every) * (0.0021 * s.curve_samples * s.sample_steps * 2 + 1)
                 for c in cases[1:] if c.curve)
    class_images = 0.2 * s.class_images * s.sample_steps / 25 if any(c.prior for c in cases) else 0.0
    return pre / 60, s.seeds * (sampling + training + curves + class_images + 3) / 60


def run(s, out, model_path=None):
    """The whole experiment into folder `out`; returns the results dict (also out/results.json, rewritten
    after each seed). `model_path`: fine-tune this toy model instead of out/model (pretrained when missing)."""
    from dreambooth_min import load
    from dreambooth_min.watch.report import write_text_atomic

    torch.set_num_threads(s.threads)
    out, timer, start = Path(out), Timer(), time.time()
    model_path = Path(model_path) if model_path else saved_model(s, out)
    pre, per = estimate_minutes(s, model_path is None)
    tqdm.write(f"estimate on 2 quiet cores: {math.ceil(pre + per)} min ("
               + (f"pretraining {pre:.0f} min, " if model_path is None else f"reusing {model_path}, ")
               + f"{s.seeds} seed(s) x {per / s.seeds:.1f} min); busy cores take longer")
    save_subject(s, out)
    if model_path is None:
        with timer("pretrain"):
            model_path = pretrained_model(s, out)
    prototypes, detectors = detector_check(s, load(model_path).vae)
    results = {"seeds": [], "per_seed": {}, "detector_accuracy": detectors, "settings": asdict(s),
               "model": relative(str(model_path), out), "prompts": dict(zip(("fidelity", "drift", "red_kept"), PROMPTS))}
    for seed in range(s.seed, s.seed + s.seeds):
        samples, numbers, seconds, commands = run_seed(s, seed, out, model_path, prototypes)
        if seed == s.seed:
            figure(samples, models(s.cases), out / "figure.png")
            results["train_commands"] = commands
        results["seeds"].append(seed)
        results["per_seed"][str(seed)] = numbers
        timer.seconds.pop("total", None)  # kept last
        timer.seconds.update({f"seed_{seed}": seconds, "total": round(time.time() - start, 1)})
        results.update(summary=summary(results["per_seed"]), goals=goals_every_seed(results["per_seed"]),
                       curves=curve_summary(results["per_seed"]), wall_seconds=timer.seconds)
        write_text_atomic(out / "results.json", json.dumps(results, indent=2))
    return results


def parse_args(argv=None):
    import argparse

    d = Settings()
    p = argparse.ArgumentParser(description="DreamBooth's two claims in a toy world, on a CPU (see examples/toyworld/ "
                                            "and docs/toyworld.md).")
    p.add_argument("--out", required=True, help="folder for the model, runs, grids, figure.png and results.json; "
                                                "a later call with the same --out reuses its pretrained model")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the world and pretraining, and the first "
                                                            "DreamBooth seed (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=d.seeds, help="DreamBooth seeds: seed, seed + 1, ... (training, class "
                   "images and samples); numbers are reported per seed and as mean and min..max (default: %(default)s)")
    p.add_argument("--cases", help=f"DreamBooth runs to make, comma-separated (default: {','.join(d.cases)})")
    p.add_argument("--tiny", action="store_true", help="tiny sizes and a few steps: checks the pipeline in seconds")
    p.add_argument("--model", help="fine-tune this toy model (the model/ folder of an earlier --out) instead of "
                                   "pretraining one")
    p.add_argument("--threads", type=int, default=d.threads, help="CPU threads (default: %(default)s)")
    for name, help_ in (("world_images", "pictures in the world"), ("unet_steps", "denoiser pretraining steps"),
                        ("vae_steps", "autoencoder steps"), ("db_steps", "DreamBooth steps of each train.py run"),
                        ("rank", "LoRA rank"), ("lr", "LoRA learning rate"), ("lora_targets", "UNet layers with LoRA"),
                        ("prior_weight", "lambda of prior preservation"), ("class_images", "class images"),
                        ("samples", "samples per prompt and model"), ("sample_steps", "sampler steps"),
                        ("guidance", "classifier-free guidance scale"),
                        ("curve_samples", "samples per prompt at each checkpoint of a curve")):
        default = getattr(d, name)
        p.add_argument("--" + name.replace("_", "-"), type=type(default), help=f"{help_} (default: {default})")
    p.add_argument("--no-text-encoder", action="store_true", help="no LoRA on the text encoder")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error("--seeds must be at least 1")
    known = [c.name for c in CASES]
    if args.cases is not None and not set(args.cases.split(",")) <= set(known):
        p.error(f"--cases: choose from {', '.join(known)}")
    return args


def settings_from_args(args):
    s = tiny_settings(args.seed) if args.tiny else Settings(seed=args.seed)
    if not args.tiny:
        s.threads = args.threads
    s.seeds = args.seeds
    if args.cases is not None:
        s.cases = tuple(c.name for c in CASES if c.name in args.cases.split(","))
    names = ("world_images", "unet_steps", "vae_steps", "db_steps", "rank", "lr", "lora_targets", "prior_weight",
             "class_images", "samples", "sample_steps", "guidance", "curve_samples")
    for name in names:
        if getattr(args, name) is not None:
            setattr(s, name, getattr(args, name))
    if args.no_text_encoder:
        s.train_text_encoder = False
    return s


def seed_lines(results):
    """One line per seed: each case's headline numbers and the goals it missed."""
    lines = []
    for seed, r in results["per_seed"].items():
        numbers = "; ".join(f"{m} " + " ".join(f"{k} {r[m][k]:.0%}" for k in ("fidelity", "drift", "red_kept"))
                            for m in r if m not in ("goals", "curves"))
        missed = [g for g, ok in r["goals"].items() if not ok]
        lines.append(f"seed {seed}: {numbers}" + (f"; missed: {', '.join(missed)}" if missed else ""))
    return lines


def main(argv=None):
    args = parse_args(argv)
    s = settings_from_args(args)
    results = run(s, args.out, args.model)
    print("\n".join(seed_lines(results)))
    main_models, busy_models = table_models(s.cases)
    print(table(results, main_models))
    if busy_models:
        print(background_table(results, busy_models))
    print("wall seconds:", json.dumps(results["wall_seconds"]))
    print("goals on every seed:", json.dumps(results["goals"]) + (
        "  (--tiny: the pipeline went through; at tiny sizes the numbers mean nothing)" if args.tiny else ""))
    print(f"figure (seed {s.seed}): {Path(args.out) / 'figure.png'}; numbers: {Path(args.out) / 'results.json'}")
    return 0
