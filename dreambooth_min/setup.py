"""Everything a run does before its first step: check, load, show the plan, draw class images, set up the
latent caches (each latent is encoded when first drawn).

Checks come first and the run folder is created only once they pass, so a run that cannot start leaves
nothing behind; Ctrl-C before the first step removes the folder again (class images drawn so far stay in
their own folder and are reused).
"""
from pathlib import Path

import torch

from . import distributed as dist
from .errors import UserError
from .hardware import resolve_hardware
from .run_folder import RunFolder


def prepare(cfg, resume, log):
    """The training.Setup of a run: model, photos, class images and latents, run folder with config.json."""
    from .checkpoint import find_default_model, load
    from .data import load_instance_images
    from .prior import default_class_dir
    from .training import Setup, config_record

    cfg.check()
    hardware = resolve_hardware(cfg.device, cfg.precision)
    hardware.device = dist.init_from_env(hardware.device)  # under torchrun: join the group, take cuda:LOCAL_RANK
    log = dist.main_log(log)
    run = RunFolder(dist.from_main(RunFolder.choose(cfg.output, resume).path))  # one default name for all
    if resume:
        dist.check_resume(run.path / "config.json")
    cfg.model = str(cfg.model or find_default_model())
    prompt, class_prompt, validation_prompt = cfg.resolved_prompts()
    sd = load(cfg.model, dtype=hardware.dtype, device=hardware.device, prediction_type=cfg.prediction_type or None,
              revision=cfg.revision or None, log=log)
    if sd.source.get("revision"):  # pin a Hub model's commit, so that --resume loads the same weights
        cfg.revision = sd.source["revision"]
    res = cfg.resolution or sd.default_resolution
    images, captions, warnings = load_instance_images(cfg.images, res, prompt)
    for w in warnings:
        log(f"warning: {w}")
    class_dir = Path(cfg.class_dir) if cfg.class_dir else default_class_dir(sd.name, class_prompt, res)
    setup = Setup(sd, hardware, run, res, prompt, class_prompt, validation_prompt, captions, None)
    if not resume:
        log(plan(cfg, setup, len(images), class_dir))
    if dist.is_main():  # rank 0 alone writes the run folder
        run.create()
    try:
        config, resolved = config_record(cfg, setup, cfg.model)
        if dist.is_main():
            run.write_config(config, resolved | {"class_dir": str(class_dir) if cfg.use_prior else None,
                                                 "source": sd.source} | dist.describe(cfg))
        setup.instance_latents, setup.class_latents = latents(cfg, setup, images, class_dir)
    except BaseException:
        if not resume and dist.is_main():
            run.remove_if_empty_start()
        raise
    return setup


def latents(cfg, setup, images, class_dir):
    """(instance, class) LatentCaches; the class images are drawn first when missing (prior preservation)."""
    from .data import LatentCache, load_image
    from .prior import ensure_class_images

    sd, res = setup.sd, setup.resolution
    class_latents = None
    if cfg.use_prior:
        # Under torchrun each process draws its share (the same files as one process), then waits for the set.
        paths = ensure_class_images(sd, class_dir, setup.class_prompt, cfg.num_class_images, res, cfg.class_steps,
                                    seed=cfg.seed, rank=dist.rank(), world=dist.world_size())
        dist.barrier()
        if not all(p.exists() for p in paths):
            raise UserError(f"class images drawn by other processes are missing in {class_dir}: with torchrun on "
                            "several machines, give --class-dir (and --output) on a filesystem they share")
        class_images = torch.stack([load_image(p, res)[0] for p in paths])
        class_latents = LatentCache(sd.vae, class_images, flip=cfg.flip)  # encoded when first drawn
    return LatentCache(sd.vae, images, flip=cfg.flip), class_latents


def plan(cfg, setup, n_images, class_dir):
    """The few lines train.py prints before any slow work: what will be learnt, from what, how long."""
    from .optim import describe as describe_optimizer
    from .prior import class_image_paths

    sd, hw = setup.sd, setup.hardware
    micro, steps = dist.schedule_length(cfg, n_images)
    have = sum(p.exists() for p in class_image_paths(class_dir, cfg.num_class_images)) if cfg.use_prior else 0
    prior = (f"{cfg.num_class_images} of {setup.class_prompt!r} in {class_dir} ({have} cached, "
             f"{cfg.num_class_images - have} to draw with {cfg.class_steps} DDIM steps each)"
             if cfg.use_prior else "none (--no-prior)")
    noun = " (person is the default class noun: give --class-noun dog/girl/backpack/... for your subject)" \
        if cfg.class_noun == "person" and "{class_noun}" in cfg.prompt else ""
    lines = [f"model       {cfg.model} ({sd.version}, {sd.prediction_type})",
             f"photos      {n_images} from {cfg.images}, {setup.resolution} px, flips {'on' if cfg.flip else 'off'}",
             f"learns      {setup.prompt!r}{noun}",
             f"prior       {prior}",
             f"validation  {setup.validation_prompt!r}" + (f" every {cfg.validate_every} epochs"
                                                          if cfg.validate_every else " off"),
             f"training    {steps} step{'s' * (steps != 1)} ({steps * cfg.grad_accum / micro:g} epochs), LoRA rank {cfg.rank} on "
             f"{','.join(cfg.lora_targets)}{' + text encoder' if cfg.train_text_encoder else ''}",
             f"optimizer   {describe_optimizer(cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.prodigy_d_coef)}",
             *([f"pivotal     new tokens {cfg.resolved_token()}, initialised from {cfg.class_noun!r}, lr "
                f"{cfg.embedding_lr or cfg.lr:g}, written to embedding.safetensors"] if cfg.pivotal else []),
             f"hardware    {hw.device}, {hw.precision}" + (f", {dist.world_size()} processes (torchrun) of "
                                                         f"batch {cfg.batch_size} each" if dist.world_size() > 1 else ""),
             f"output      {setup.run.path}"]
    return "\n".join(lines)

