"""The training run: set up, then repeat dreambooth_step (dreambooth.py) and an optimizer step on the LoRA.

train() reads top to bottom: check the settings, load the model and photos, draw the class images, cache
latents, add LoRA, then the loop; Ctrl-C saves a checkpoint from which `resume=True` continues exactly.
"""
import dataclasses
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .dreambooth import assemble_batch, dreambooth_step
from .lora import TEXT_TARGETS, inject_lora
from .run_folder import RunFolder
from .state import TrainingState


class Interrupted(Exception):
    """Raised by `stop_after` (tests) to take the same path as Ctrl-C."""


@dataclass
class Setup:
    """What the loop needs besides the settings: the model, the data, where to write."""
    sd: object  # model.StableDiffusion
    hardware: object  # hardware.Hardware
    run: RunFolder
    resolution: int
    prompt: str
    class_prompt: str
    validation_prompt: str
    captions: list
    instance_latents: object  # data.LatentCache
    class_latents: object = None  # data.LatentCache, or None without prior preservation


def train(cfg, resume=False, stop_after=None, log=tqdm.write):
    """Train a DreamBooth LoRA; returns {"output", "lora", "step", "interrupted"}.

    `resume` continues the run in cfg.output from its latest checkpoint. Ctrl-C (KeyboardInterrupt) saves
    a checkpoint at the last finished step and returns with interrupted=True.
    """
    from .setup import prepare

    setup = prepare(cfg, resume, log)
    torch.manual_seed(cfg.seed)  # LoRA's down factors are drawn from the global generator
    unet_loras = inject_lora(setup.sd.unet, cfg.lora_targets, cfg.rank, cfg.alpha or None)
    text_loras = inject_lora(setup.sd.text_encoder, TEXT_TARGETS, cfg.rank, cfg.alpha or None) \
        if cfg.train_text_encoder else {}
    setup.sd.unet.gradient_checkpointing = cfg.gradient_checkpointing
    micro_per_epoch, total_steps = cfg.schedule_length(len(setup.instance_latents))
    state = TrainingState(cfg, unet_loras, text_loras, setup.hardware.grad_scaler(), total_steps)
    if resume:
        checkpoint = setup.run.latest_checkpoint()
        state.load(checkpoint)
        log(f"resumed from {checkpoint} (step {state.step} of {total_steps})")
        setup.run.drop_after(state.step, state.step * cfg.grad_accum // micro_per_epoch)
    elif cfg.validate_every:
        validate(cfg, setup, epoch=0)
    interrupted = run_loop(cfg, setup, state, total_steps, micro_per_epoch, stop_after)
    setup.run.plot_loss()
    if interrupted:
        checkpoint = save_checkpoint(cfg, setup, state)
        log(f"interrupted at step {state.step}/{total_steps}: checkpoint saved in {checkpoint}; "
            f"continue with: python train.py --resume {setup.run.path}")
        return {"output": setup.run.path, "lora": checkpoint / "lora.safetensors", "step": state.step,
                "interrupted": True}
    from .lora_file import save_lora

    save_lora(setup.run.lora_path, state.lora_tensors(), lora_metadata(cfg, setup, state.step))
    log(f"done: {state.step} steps; LoRA in {setup.run.lora_path}; samples in {setup.run.samples}; loss plot "
        f"{setup.run.path / 'loss.png'}; try: python sample.py --model {cfg.model} --lora {setup.run.lora_path} "
        f"--prompt \"{setup.prompt} on the beach\" --height {setup.resolution} --width {setup.resolution}")
    return {"output": setup.run.path, "lora": setup.run.lora_path, "step": state.step, "interrupted": False}


def run_loop(cfg, setup, state, total_steps, micro_per_epoch, stop_after=None):
    """Micro-batches until `total_steps` optimizer steps; returns True when interrupted (Ctrl-C)."""
    from .data import epoch_order

    sd, n = setup.sd, len(setup.instance_latents)
    bs = min(cfg.batch_size, n)
    contexts = TextContexts(sd, trainable=bool(state.text_loras))
    bar = tqdm(total=total_steps, initial=state.step, desc="training", unit="step")
    start, boundary, running = time.time(), state.generator.get_state(), None
    try:
        for micro in range(state.step * cfg.grad_accum, total_steps * cfg.grad_accum):
            epoch, pos = divmod(micro, micro_per_epoch)
            index = epoch_order(n, cfg.seed, epoch)[pos * bs:(pos + 1) * bs]
            batch = assemble_batch(setup.instance_latents, setup.captions, index, setup.class_latents,
                                   setup.class_prompt, state.generator, cfg.offset_noise)
            sd.unet.train()
            with setup.hardware.autocast():
                parts = dreambooth_step(sd.unet, batch, contexts(batch.prompts), sd.prediction_type,
                                        cfg.prior_weight if cfg.use_prior else 0.0, cfg.snr_gamma)
            state.scaler.scale(parts[0] / cfg.grad_accum).backward()
            parts = torch.stack(parts).detach() / cfg.grad_accum
            running = parts if running is None else running + parts  # the mean over the micro-batches
            if (micro + 1) % cfg.grad_accum == 0:
                log_step(cfg, setup, state, running, (micro + 1) / micro_per_epoch, time.time() - start, bar)
                boundary, running = state.generator.get_state(), None
                if cfg.save_every and state.step % cfg.save_every == 0 and state.step < total_steps:
                    save_checkpoint(cfg, setup, state)
            epochs_done = (micro + 1) // micro_per_epoch
            if (micro + 1) % micro_per_epoch == 0 and cfg.validate_every and epochs_done % cfg.validate_every == 0:
                validate(cfg, setup, epochs_done)
            if stop_after is not None and state.step >= stop_after:
                raise Interrupted
    except (KeyboardInterrupt, Interrupted):
        state.generator.set_state(boundary)  # the state at the last finished step, which is what we save
        state.optimizer.zero_grad(set_to_none=True)
        return True
    finally:
        bar.close()
    return False


def log_step(cfg, setup, state, running, epoch, seconds, bar):
    """One optimizer step, then its line in log.jsonl and the progress bar."""
    lr = state.optimizer.param_groups[0]["lr"]  # the rate this step uses
    grad_norm = state.optimizer_step(cfg.max_grad_norm)
    loss, loss_instance, loss_prior = running.tolist()
    record = {"step": state.step, "epoch": round(epoch, 4), "loss": loss, "loss_instance": loss_instance,
              "loss_prior": loss_prior, "lr": lr, "grad_norm": grad_norm.item(), "seconds": round(seconds, 3)}
    setup.run.append_log(record)
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
    bar.update(1)
    return record


class TextContexts:
    """Text encodings of captions; a frozen text encoder gives the same one every step, so it is cached."""

    def __init__(self, sd, trainable):
        self.sd, self.trainable, self.cache = sd, trainable, {}

    def __call__(self, prompts):
        if self.trainable:
            return self.sd.encode_prompt(prompts)
        for p in set(prompts) - self.cache.keys():
            with torch.no_grad():
                self.cache[p] = self.sd.encode_prompt([p])
        return torch.cat([self.cache[p] for p in prompts])


def validate(cfg, setup, epoch):
    """`validation_images` images of the validation prompt, same seeds every time: one row per epoch."""
    from .sampling import generate, parameters_text

    res = setup.resolution
    setup.sd.unet.eval()
    with torch.no_grad():
        images = generate(setup.sd, setup.validation_prompt, num_images=cfg.validation_images,
                          steps=cfg.validation_steps, seed=cfg.seed, height=res, width=res, progress=False)
    parameters = parameters_text(setup.validation_prompt, "", cfg.validation_steps, 7.5, cfg.seed, res, res,
                                 setup.sd.name, 0.0)
    setup.run.save_samples(epoch, images, parameters)
    setup.run.save_validation_row(epoch, images, parameters)


def lora_metadata(cfg, setup, step):
    """What a LoRA file says about its training (kohya's ss_* keys, which A1111 shows)."""
    sd = setup.sd
    return {"ss_base_model": sd.name, "ss_sd_version": sd.version, "ss_prediction_type": sd.prediction_type,
            "ss_instance_prompt": setup.prompt, "ss_class_prompt": setup.class_prompt if cfg.use_prior else "",
            "ss_resolution": str(setup.resolution), "ss_network_dim": str(cfg.rank),
            "ss_network_alpha": str(cfg.alpha or cfg.rank), "ss_training_tool": "dreambooth_min",
            "ss_steps": str(step)}


def save_checkpoint(cfg, setup, state):
    folder = state.save(setup.run.path, lora_metadata(cfg, setup, state.step))
    setup.run.prune_checkpoints(cfg.keep_checkpoints)
    return folder


def config_record(cfg, setup, model_path):
    """config.json: every setting (with the model path resolved) and what was decided from them."""
    sd = setup.sd
    return dataclasses.asdict(cfg) | {"model": str(model_path)}, {
        "model": str(model_path), "version": sd.version, "prediction_type": sd.prediction_type,
        "resolution": setup.resolution, "device": setup.hardware.device, "precision": setup.hardware.precision,
        "prompt": setup.prompt, "class_prompt": setup.class_prompt, "validation_prompt": setup.validation_prompt,
        "instance_images": len(setup.captions)}
