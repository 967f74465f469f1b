"""DreamBooth with LoRA: the loss, the schedule of the learning rate, and the training loop.

DreamBooth (Ruiz et al. 2023, eq. 2) fine-tunes the denoiser on a few photos of one subject, captioned
"a photo of sks dog", while a prior-preservation term keeps it able to draw other dogs:

    L = E[ w_t || x̂(a_t x + s_t eps, c) - target ||^2 ] + lambda * E[ w_t' || x̂(a_t' x_pr + s_t' eps', c_pr) - target' ||^2 ]

with x the instance latents, x_pr the model's own class images ("a photo of dog"), and the target the
noise eps or the velocity v, whichever the checkpoint predicts. Only LoRA factors are trained (Hu et al.
2021): the base weights stay frozen, in half precision on CUDA.
"""
import dataclasses
import json
import math
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import UserError
from .lora import TEXT_TARGETS, UNET_TARGETS, inject_lora, lora_parameters
from .lora_file import kohya_name, load_lora, lora_state_dict, save_lora
from .scheduler import NUM_TRAIN_TIMESTEPS, add_noise, alphas_cumprod, v_target


@dataclass
class TrainConfig:
    images: str = ""  # folder of 3-10 photos of the subject
    model: str = ""  # checkpoint; empty: the one in weights/
    output: str = ""  # run folder; empty: runs/<timestamp>
    class_noun: str = "person"  # what the subject is ("dog", "girl"): the prior's class
    prompt: str = "a photo of sks {class_noun}"  # instance prompt; "sks" is the rare token learnt
    class_prompt: str = "a photo of {class_noun}"
    prior_weight: float = 1.0  # lambda of DreamBooth eq. 2; 0 disables prior preservation
    num_class_images: int = 100
    class_dir: str = ""  # empty: class_images/<model>/<class prompt>-<resolution>
    class_steps: int = 30  # DDIM steps per class image
    resolution: int = 0  # 0: the model's (512 SD 1.x / 2.x-base, 768 SD 2.x v)
    flip: bool = True
    rank: int = 4
    alpha: float = 0.0  # 0: = rank (scale 1)
    lora_targets: tuple = UNET_TARGETS
    train_text_encoder: bool = False
    text_encoder_lr: float = 0.0  # 0: = lr
    lr: float = 1e-4
    lr_scheduler: str = "constant"  # constant | cosine (both after linear warmup)
    warmup_steps: int = 0
    weight_decay: float = 1e-2
    batch_size: int = 1  # instance images per step (as many class images are added)
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    epochs: int = 300  # passes over the instance images ...
    steps: int = 0  # ... or, when > 0, this many optimizer steps
    snr_gamma: float = 0.0  # > 0: min-SNR-gamma loss weighting (Hang et al. 2023); 5 is usual
    offset_noise: float = 0.0  # > 0: add offset * N(0, 1) per channel to the noise (brighter/darker images)
    precision: str = ""  # fp16 | bf16 | fp32; empty: fp16 on CUDA, fp32 on CPU
    gradient_checkpointing: bool = False
    device: str = ""  # empty: cuda if available
    seed: int = 0
    validate_every: int = 50  # epochs; 0 disables
    validation_prompt: str = "{prompt} in the snow"
    validation_images: int = 4
    validation_steps: int = 30
    save_every: int = 250  # optimizer steps between checkpoints; 0: only at the end / on Ctrl-C
    keep_checkpoints: int = 2
    prediction_type: str = ""  # empty: detected from the checkpoint

    def resolved_prompts(self):
        """(instance, class, validation) prompts with {class_noun} and {prompt} filled in."""
        try:
            prompt = self.prompt.format(class_noun=self.class_noun)
            return prompt, self.class_prompt.format(class_noun=self.class_noun), \
                self.validation_prompt.format(prompt=prompt, class_noun=self.class_noun)
        except (KeyError, IndexError, ValueError) as e:
            raise UserError(f"a prompt has an unknown placeholder {e}: only {{class_noun}} (and {{prompt}} in "
                            "--validation-prompt) are filled in; write literal braces as {{ }}") from None

    def check(self):
        """One clear line for a setting that cannot train anything."""
        positive = {"--rank": self.rank, "--batch-size": self.batch_size, "--grad-accum": self.grad_accum,
                    "--lr": self.lr, "--class-steps": self.class_steps}
        if self.validate_every:
            positive.update({"--validation-images": self.validation_images, "--validation-steps": self.validation_steps})
        if not self.steps:
            positive["--epochs"] = self.epochs
        for flag, value in positive.items():
            if not value > 0:
                raise UserError(f"{flag} must be positive, not {value}")
        for flag, value in {"--steps": self.steps, "--num-class-images": self.num_class_images,
                            "--prior-weight": self.prior_weight, "--warmup-steps": self.warmup_steps,
                            "--validate-every": self.validate_every, "--save-every": self.save_every,
                            "--snr-gamma": self.snr_gamma, "--offset-noise": self.offset_noise,
                            "--alpha": self.alpha, "--resolution": self.resolution}.items():
            if value < 0:
                raise UserError(f"{flag} must not be negative, not {value}")
        if self.resolution % 8:
            raise UserError(f"--resolution must be a multiple of 8, not {self.resolution}")
        if self.lr_scheduler not in ("constant", "cosine"):
            raise UserError(f"--lr-scheduler must be constant or cosine, not {self.lr_scheduler!r}")
        self.resolved_prompts()


# ---------------------------------------------------------------------------------------------------
# The loss

def snr(t):
    """Signal-to-noise ratio of x_t: SNR(t) = a_t / (1 - a_t)  (Kingma et al. 2021, eq. 3 with a_t = alpha^2)."""
    a = alphas_cumprod()[t.cpu()]
    return (a / (1 - a)).float().to(t.device)


def min_snr_weight(t, gamma, prediction_type):
    """Min-SNR-gamma weights (Hang et al. 2023, eq. 8), expressed for the loss on eps or on v.

    The x0-loss weight min(SNR, gamma) becomes min(SNR, gamma) / SNR on eps and
    min(SNR, gamma) / (SNR + 1) on v, because ||eps err||^2 = SNR ||x0 err||^2 and ||v err||^2 = (SNR+1) ||x0 err||^2.
    """
    s = snr(t)
    return torch.minimum(s, torch.full_like(s, gamma)) / (s + 1 if prediction_type == "v_prediction" else s)


def dreambooth_loss(pred, target, n_instance, prior_weight, weights=None):
    """DreamBooth eq. 2 on a batch [instance rows; class rows]: (loss, instance part, prior part).

    Each row's squared error is averaged over its pixels and optionally weighted (min-SNR); the two parts
    are means over their rows, the prior part multiplied by lambda = `prior_weight`.
    """
    per_row = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if weights is not None:
        per_row = per_row * weights
    instance = per_row[:n_instance].mean()
    prior = per_row[n_instance:].mean() if len(per_row) > n_instance else torch.zeros_like(instance)
    return instance + prior_weight * prior, instance, prior


def lr_lambda(step, warmup, total, kind):
    """Multiplier of the base learning rate: linear warmup, then constant or half-cosine to zero."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


# ---------------------------------------------------------------------------------------------------
# Checkpoints: everything needed for a resumed run to continue exactly as an uninterrupted one

def save_checkpoint(folder, step, unet_loras, text_loras, optimizer, scaler, scheduler, generator, metadata, keep):
    """checkpoints/step_NNNNNN/{lora.safetensors, state.pt}, written to a temp folder then renamed."""
    root = Path(folder) / "checkpoints"
    final = root / f"step_{step:06d}"
    tmp = root / f".step_{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_lora(tmp / "lora.safetensors", lora_state_dict(unet_loras, text_loras), metadata)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "lr_scheduler": scheduler.state_dict(), "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state()}, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(root.glob("step_*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(folder):
    found = sorted((Path(folder) / "checkpoints").glob("step_*"))
    return found[-1] if found else None


def load_checkpoint(path, unet_loras, text_loras, optimizer, scaler, scheduler, generator):
    tensors, _ = load_lora(path / "lora.safetensors")
    state = torch.load(path / "state.pt", weights_only=True)  # our own file; still never a full unpickle
    with torch.no_grad():
        for part, loras in (("unet", unet_loras), ("te", text_loras)):
            for name, m in loras.items():
                k = kohya_name(name, part)
                for field, w in (("lora_down", m.lora_down.weight), ("lora_up", m.lora_up.weight)):
                    saved = tensors.get(f"{k}.{field}.weight")
                    if saved is None or saved.shape != w.shape:
                        raise UserError(f"checkpoint {path} does not fit this model and configuration "
                                        f"({k}.{field}): was the base model in weights/ replaced?")
                    w.copy_(saved)
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    scheduler.load_state_dict(state["lr_scheduler"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    return state["step"]


# ---------------------------------------------------------------------------------------------------
# The run

def resolve_device(cfg):
    """(device, precision, weight dtype): fp16 weights + autocast + GradScaler on CUDA, fp32 on the CPU."""
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for, but this machine has no CUDA GPU (use --device cpu)")
    precision = cfg.precision or ("fp16" if device.startswith("cuda") else "fp32")
    if precision not in ("fp16", "bf16", "fp32"):
        raise UserError(f"--precision must be fp16, bf16 or fp32, not {precision!r}")
    if precision == "fp16" and not device.startswith("cuda"):
        raise UserError("fp16 training needs a CUDA GPU; on the CPU use --precision bf16 or fp32")
    return device, precision, {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]


def output_folder(cfg, resume):
    """The run folder, checked before any slow work: free (or resumable) and writable."""
    import os

    out = Path(cfg.output or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    if not resume and (latest_checkpoint(out) is not None or (out / "lora.safetensors").exists()):
        raise UserError(f"{out} already holds a run: continue it with --resume {out}, or choose another --output")
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to the output folder {out}: {existing} is not a writable folder")
    return out


def create_output(out):
    try:
        (out / "samples").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write to the output folder {out}: {e.strerror or e}") from None
    return out


def config_from_json(path):
    """The TrainConfig saved in a run's config.json (for --resume)."""
    try:
        saved = json.loads(Path(path).read_text())["config"]
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read the run's configuration {path}: {e}") from None
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    saved = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in names}
    return TrainConfig(**saved)  # `model` holds the path resolved when the run started


class Interrupted(Exception):
    """Raised by `stop_after` (tests) to take the same path as Ctrl-C."""


def train(cfg, resume=False, stop_after=None, log=tqdm.write):
    """Train a DreamBooth LoRA; returns {"output", "lora", "step", "interrupted"}.

    `resume` continues the run in cfg.output from its latest checkpoint. Ctrl-C (KeyboardInterrupt) saves
    a checkpoint at the last finished step and returns with interrupted=True.
    """
    from .checkpoint import find_default_model, load
    from .data import LatentCache, load_image, load_instance_images
    from .prior import default_class_dir, ensure_class_images
    from .report import append_jsonl, labelled_row, plot_loss, read_jsonl, stack_rows, write_text_atomic
    from .sampling import generate, parameters_text, save_png

    cfg.check()
    device, precision, dtype = resolve_device(cfg)
    if resume and (Path(cfg.output) / "lora.safetensors").exists():
        raise UserError(f"the run in {cfg.output} is finished: its LoRA is {Path(cfg.output) / 'lora.safetensors'}")
    out = output_folder(cfg, resume)
    model_path = Path(cfg.model) if cfg.model else find_default_model()
    prompt, class_prompt, validation_prompt = cfg.resolved_prompts()
    sd = load(model_path, dtype=dtype, device=device, prediction_type=cfg.prediction_type or None)
    res = cfg.resolution or sd.default_resolution
    images, captions, warnings = load_instance_images(cfg.images, res, prompt)
    for w in warnings:
        log(f"warning: {w}")
    create_output(out)  # only now: a run that cannot start leaves no folder behind
    use_prior = cfg.prior_weight > 0 and cfg.num_class_images > 0
    class_dir = Path(cfg.class_dir) if cfg.class_dir else default_class_dir(sd.name, class_prompt, res)
    write_text_atomic(out / "config.json", json.dumps({"config": dataclasses.asdict(cfg) | {"model": str(model_path)}, "resolved": {
        "model": str(model_path), "version": sd.version, "prediction_type": sd.prediction_type, "resolution": res,
        "device": device, "precision": precision, "prompt": prompt, "class_prompt": class_prompt,
        "class_dir": str(class_dir) if use_prior else None, "instance_images": len(images)}}, indent=2))

    # Prior preservation: the frozen base model's own class images, drawn before any LoRA exists.
    if use_prior:
        paths = ensure_class_images(sd, class_dir, class_prompt, cfg.num_class_images, res, cfg.class_steps, seed=cfg.seed)
        class_cache = LatentCache(sd.vae, torch.stack([load_image(p, res)[0] for p in paths]), flip=cfg.flip)
    instance_cache = LatentCache(sd.vae, images, flip=cfg.flip)

    torch.manual_seed(cfg.seed)  # LoRA's down factors are drawn from the global generator
    unet_loras = inject_lora(sd.unet, cfg.lora_targets, cfg.rank, cfg.alpha or None)
    text_loras = inject_lora(sd.text_encoder, TEXT_TARGETS, cfg.rank, cfg.alpha or None) if cfg.train_text_encoder else {}
    sd.unet.gradient_checkpointing = cfg.gradient_checkpointing
    contexts = {}  # a frozen text encoder gives the same context for a caption every step

    def context_for(prompts):
        if text_loras:
            return sd.encode_prompt(prompts)
        for p in set(prompts) - contexts.keys():
            with torch.no_grad():
                contexts[p] = sd.encode_prompt([p])
        return torch.cat([contexts[p] for p in prompts])

    groups = [{"params": lora_parameters(unet_loras), "lr": cfg.lr}]
    if text_loras:
        groups.append({"params": lora_parameters(text_loras), "lr": cfg.text_encoder_lr or cfg.lr})
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    n, bs = len(instance_cache), min(cfg.batch_size, len(instance_cache))
    micro_per_epoch = math.ceil(n / bs)
    total_steps = cfg.steps or math.ceil(cfg.epochs * micro_per_epoch / cfg.grad_accum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, cfg.warmup_steps, total_steps, cfg.lr_scheduler))
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    generator = torch.Generator().manual_seed(cfg.seed)  # every random draw of training comes from here
    metadata = {"ss_base_model": sd.name, "ss_sd_version": sd.version, "ss_prediction_type": sd.prediction_type,
                "ss_instance_prompt": prompt, "ss_class_prompt": class_prompt if use_prior else "",
                "ss_resolution": str(res), "ss_network_dim": str(cfg.rank), "ss_network_alpha": str(cfg.alpha or cfg.rank),
                "ss_training_tool": "dreambooth_min"}

    step = 0
    if resume:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            raise UserError(f"nothing to resume in {out}: it has no checkpoints/")
        step = load_checkpoint(ckpt, unet_loras, text_loras, optimizer, scaler, scheduler, generator)
        log(f"resumed from {ckpt} (step {step} of {total_steps})")
        # What a crashed run wrote after its checkpoint is redone: drop it from the log and the samples.
        records = [r for r in read_jsonl(out / "log.jsonl") if r["step"] <= step]
        write_text_atomic(out / "log.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        done_epochs = step * cfg.grad_accum // micro_per_epoch
        for row in (out / "samples").glob("epoch_*.png"):
            if int(row.stem.split("_")[1]) > done_epochs:
                row.unlink()

    def validate(epoch):
        sd.unet.eval()
        with torch.no_grad():
            imgs = generate(sd, validation_prompt, num_images=cfg.validation_images, steps=cfg.validation_steps,
                            seed=cfg.seed, height=res, width=res, progress=False)
        row = out / "samples" / f"epoch_{epoch:04d}.png"
        save_png(labelled_row(imgs, f"epoch {epoch}"), row,
                 parameters_text(validation_prompt, "", cfg.validation_steps, 7.5, cfg.seed, res, res, sd.name, 0.0))
        stack_rows(sorted((out / "samples").glob("epoch_*.png")), out / "samples" / "grid.png")

    def checkpoint(at_step):
        metadata["ss_steps"] = str(at_step)
        return save_checkpoint(out, at_step, unet_loras, text_loras, optimizer, scaler, scheduler, generator,
                               metadata, cfg.keep_checkpoints)

    amp = dict(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=dtype, enabled=precision != "fp32")
    x_dtype = torch.float32 if precision == "fp32" else dtype
    if cfg.validate_every and step == 0:
        validate(0)
    bar = tqdm(total=total_steps, initial=step, desc="training", unit="step")
    start, boundary_state, interrupted, running = time.time(), generator.get_state(), False, None
    try:
        for micro in range(step * cfg.grad_accum, total_steps * cfg.grad_accum):
            epoch, pos = divmod(micro, micro_per_epoch)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
            idx = perm[pos * bs:(pos + 1) * bs]
            z0, prompts = instance_cache.sample(idx, generator), [captions[i] for i in idx]
            if use_prior:
                cidx = torch.randint(len(class_cache), (len(idx),), generator=generator)
                z0, prompts = torch.cat([z0, class_cache.sample(cidx, generator)]), prompts + [class_prompt] * len(idx)
            noise = torch.randn(z0.shape, generator=generator)
            if cfg.offset_noise:
                noise = noise + cfg.offset_noise * torch.randn(z0.shape[:2] + (1, 1), generator=generator)
            t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (len(z0),), generator=generator)
            z0, noise, t = z0.to(device), noise.to(device), t.to(device)
            x_t = add_noise(z0, noise, t)  # q(x_t | x_0)
            target = noise if sd.prediction_type == "epsilon" else v_target(z0, noise, t)
            sd.unet.train()
            with torch.autocast(**amp):
                pred = sd.unet(x_t.to(x_dtype), t, context_for(prompts))
            weights = min_snr_weight(t, cfg.snr_gamma, sd.prediction_type) if cfg.snr_gamma > 0 else None
            loss, loss_instance, loss_prior = dreambooth_loss(pred, target, len(idx), cfg.prior_weight if use_prior else 0.0, weights)
            scaler.scale(loss / cfg.grad_accum).backward()
            parts = torch.stack([loss, loss_instance, loss_prior]).detach() / cfg.grad_accum
            running = parts if running is None else running + parts  # the mean over the micro-batches
            if (micro + 1) % cfg.grad_accum == 0:  # an optimizer step
                lr = optimizer.param_groups[0]["lr"]  # the rate this step uses
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1
                boundary_state = generator.get_state()
                mean_loss, mean_instance, mean_prior = running.tolist()
                running = None
                record = {"step": step, "epoch": round((micro + 1) / micro_per_epoch, 4), "loss": mean_loss,
                          "loss_instance": mean_instance, "loss_prior": mean_prior, "lr": lr,
                          "grad_norm": grad_norm.item(), "seconds": round(time.time() - start, 3)}
                append_jsonl(out / "log.jsonl", record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                bar.update(1)
                if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                    checkpoint(step)
            if (micro + 1) % micro_per_epoch == 0 and cfg.validate_every and ((micro + 1) // micro_per_epoch) % cfg.validate_every == 0:
                validate((micro + 1) // micro_per_epoch)
            if stop_after is not None and step >= stop_after:
                raise Interrupted
    except (KeyboardInterrupt, Interrupted):
        interrupted = True
        generator.set_state(boundary_state)  # the state at the last finished step, which is what we save
        optimizer.zero_grad(set_to_none=True)
    bar.close()
    plot_loss(read_jsonl(out / "log.jsonl"), out / "loss.png")
    if interrupted:
        ckpt = checkpoint(step)
        log(f"interrupted at step {step}/{total_steps}: checkpoint saved in {ckpt}; "
            f"continue with: python train.py --resume {out}")
        return {"output": out, "lora": ckpt / "lora.safetensors", "step": step, "interrupted": True}
    metadata["ss_steps"] = str(step)
    lora_path = out / "lora.safetensors"
    save_lora(lora_path, lora_state_dict(unet_loras, text_loras), metadata)
    log(f"done: {step} steps; LoRA in {lora_path}; samples in {out / 'samples'}; loss plot {out / 'loss.png'}; "
        f"try: python sample.py --model {model_path} --lora {lora_path} --prompt \"{prompt} on the beach\"")
    return {"output": out, "lora": lora_path, "step": step, "interrupted": False}
