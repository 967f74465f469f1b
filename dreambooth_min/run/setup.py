"""Everything a run does before its first step: check, load, show the plan, draw class images, set up the
latent caches (each latent is encoded when first drawn).

Checks come first and the run folder is created only once they pass, so a run that cannot start leaves
nothing behind; Ctrl-C before the first step removes the folder again (class images drawn so far stay in
their own folder and are reused).
"""
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SettingError, UserError
from ..formats.checkpoint import find_default_model, load
from ..formats.lora_file import training_metadata
from ..formats.safetensors_io import check_writable
from ..lora import unknown_targets
from . import distributed as dist
from .buckets import bucket_list, bucket_sizes, class_counts, describe as describe_buckets
from .data import LatentCache, check_masks, load_image, load_photos, original_size, photo_time_ids
from .estimate import compile_line, duration, estimate, is_full_size, seconds_per_latent
from .hardware import precision_name, resolve_hardware
from .optim import describe as describe_optimizer
from .prior import class_image_paths, default_class_dir, ensure_class_images
from .run_folder import RunFolder


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
    class_latents: object = None  # data.LatentCache ({bucket: LatentCache} with --aspect-buckets); None: no prior
    monitor: object = None  # watch/validation.Monitor: tracker and evaluators
    lora_tensors: object = None  # () -> the LoRA's tensors now (for lora_best.safetensors)
    buckets: list = None  # --aspect-buckets: each photo's bucket (H, W); None: all R x R
    masked: bool = False  # the photos have masks (name.mask.png or --masks)

    def class_latents_for(self, index):
        """The class images drawn beside photos `index`: with --aspect-buckets those of the photos' bucket."""
        if self.buckets is None or self.class_latents is None:
            return self.class_latents
        return self.class_latents[self.buckets[int(index[0])]]

    def lora_metadata(self, cfg, step):
        """The training facts a LoRA file records (lora_file.training_metadata)."""
        return training_metadata(self.sd, self.prompt, self.class_prompt if cfg.use_prior else "", self.resolution,
                                 cfg.rank, cfg.alpha or cfg.rank, step)


def prepare(cfg, resume, log):
    """The Setup of a run: model, photos, class images and latents, run folder with config.json."""
    cfg.check()
    hardware = resolve_hardware(cfg.device, cfg.precision)
    hardware.device = dist.init_from_env(hardware.device)  # under torchrun: join the group, take cuda:LOCAL_RANK
    log = dist.main_log(log)
    run = RunFolder(dist.from_main(RunFolder.choose(cfg.output, resume).path))  # one default name for all
    if resume:
        dist.check_resume(run.path / "config.json")
    check_class_dir(cfg)
    masks = check_masks(cfg.images, cfg.masks) if Path(cfg.images).is_dir() else {}  # a bad mask: before the model
    default_model = not cfg.model
    cfg.model = str(cfg.model or find_default_model())
    prompt, class_prompt, validation_prompt = cfg.resolved_prompts()
    sd = load(cfg.model, dtype=hardware.dtype, device=hardware.device, prediction_type=cfg.prediction_type or None,
              revision=cfg.revision or None, log=log)
    check_lora_targets(cfg, sd)
    if sd.source.get("revision"):  # pin a Hub model's commit, so that --resume loads the same weights
        cfg.revision = sd.source["revision"]
    sd.vae.to(hardware.vae_dtype(sd.version, cfg.vae_precision))
    res = cfg.resolution or sd.default_resolution
    photos = load_photos(cfg.images, res, prompt, bucket_list(res) if cfg.aspect_buckets else None, masks)
    for w in photos.warnings:
        log(f"warning: {w}")
    class_dir = Path(cfg.class_dir) if cfg.class_dir else default_class_dir(sd.name, class_prompt, res)
    setup = Setup(sd, hardware, run, res, prompt, class_prompt, validation_prompt, photos.captions, None,
                  buckets=photos.buckets, masked=bool(masks))
    plan_text = None if resume else plan(cfg, setup, len(photos.images), class_dir, default_model)
    if plan_text:
        log(plan_text)
    if dist.is_main():  # rank 0 alone writes the run folder
        run.create()
        if plan_text:
            run.write_plan(plan_text)  # for report.html
    try:
        config, resolved = config_record(cfg, setup, cfg.model)
        if dist.is_main():
            run.write_config(config, resolved | {"class_dir": str(class_dir) if cfg.use_prior else None,
                                                 "source": sd.source} | dist.describe(cfg))
        setup.instance_latents, setup.class_latents = latents(cfg, setup, photos, class_dir)
    except BaseException:
        if not resume and dist.is_main():
            run.remove_if_empty_start()
        raise
    return setup


def check_class_dir(cfg):
    """A --class-dir that cannot hold the class images stops here, before the model is loaded."""
    if not cfg.use_prior or cfg.class_dir and all(p.exists() for p in class_image_paths(cfg.class_dir,
                                                                                        cfg.num_class_images)):
        return  # a full set is only read
    check_writable(cfg.class_dir or "class_images", "--class-dir" if cfg.class_dir else "the class images in",
                   folder=True)


def check_lora_targets(cfg, sd):
    """Every --lora-targets entry names layers of this UNet (checked before the plan and the run folder)."""
    unknown = unknown_targets(sd.unet, cfg.lora_targets)
    if unknown:
        names = ", ".join(f"{t!r}" + (f" (did you mean {near!r}?)" if near else "") for t, near in unknown)
        raise SettingError("lora_targets", f"{names} name{'s' * (len(unknown) == 1)} no Linear or Conv2d layer of "
                                           "this UNet (a target is the end of layer names, e.g. to_q, to_out.0, "
                                           "proj_in, ff.net.2, conv1)")


def latents(cfg, setup, photos, class_dir):
    """(instance, class) LatentCaches; the class images are drawn first when missing (prior preservation). With
    --aspect-buckets the class images are {bucket: LatentCache}, one set per bucket in use (class_sets).
    SDXL's caches hold each image's size conditioning, from its original size and the size it is trained at."""
    sd, res = setup.sd, setup.resolution
    class_latents = None
    if cfg.use_prior:
        pools = {size: class_cache(cfg, setup, folder, n, size)
                 for size, folder, n in class_sets(cfg, setup, class_dir)}
        class_latents = pools if setup.buckets else pools[res, res]
    targets = [tuple(x.shape[-2:]) for x in photos.images]
    sizes = photo_time_ids(photos.sizes, res, targets) if sd.version == "sdxl" else None
    images = photos.images if setup.buckets else torch.stack(photos.images)
    return LatentCache(sd.vae, images, flip=cfg.flip, sizes=sizes, masks=photos.masks), class_latents


def class_sets(cfg, setup, class_dir):
    """[(size (H, W), folder, how many)] of the class images: --num-class-images at R x R in `class_dir`, or with
    --aspect-buckets a set per bucket in use, shared in proportion to its photos (class_dir/WxH; R x R in class_dir)."""
    res, class_dir = setup.resolution, Path(class_dir)
    if not setup.buckets:
        return [((res, res), class_dir, cfg.num_class_images)]
    return [((h, w), class_dir if (h, w) == (res, res) else class_dir / f"{w}x{h}", n)
            for (h, w), n in class_counts(setup.buckets, cfg.num_class_images).items()]


def class_cache(cfg, setup, folder, n, size):
    """The LatentCache of n class images of `size` (H, W) in `folder`, drawn first where missing."""
    sd, res = setup.sd, setup.resolution
    # Under torchrun each process draws its share (the same files as one process), then waits for the set.
    paths = ensure_class_images(sd, folder, setup.class_prompt, n, res if size == (res, res) else size,
                                cfg.class_steps, seed=cfg.seed, rank=dist.rank(), world=dist.world_size())
    dist.barrier()
    if not all(p.exists() for p in paths):
        raise UserError(f"class images drawn by other processes are missing in {folder}: with torchrun on "
                        "several machines, give --class-dir (and --output) on a filesystem they share")
    class_images = torch.stack([load_image(p, res, size)[0] for p in paths])
    class_sizes = photo_time_ids([original_size(p) for p in paths], res, [size] * n) if sd.version == "sdxl" else None
    return LatentCache(sd.vae, class_images, flip=cfg.flip, sizes=class_sizes)  # encoded when first drawn


def plan(cfg, setup, n_images, class_dir, default_model=False):
    """The few lines train.py prints before any slow work: what will be learnt, from what, how long."""
    sd, hw = setup.sd, setup.hardware
    micro, steps = dist.schedule_length(cfg, n_images, bucket_sizes(setup.buckets))
    epochs = steps * cfg.grad_accum / micro
    sets = class_sets(cfg, setup, class_dir) if cfg.use_prior else []
    have, wanted = sum(sum(p.exists() for p in class_image_paths(f, n)) for _, f, n in sets), sum(n for *_, n in sets)
    sizes = f" in {plural(len(sets), 'size')} (a share per bucket)" if setup.buckets else ""
    prior = (f"{wanted} of {setup.class_prompt!r} in {class_dir}{sizes} ({have} cached, "
             f"{wanted - have} to draw with {cfg.class_steps} DDIM steps each)"
             if cfg.use_prior else "none (--no-prior)")
    noun = " (person is the default class noun: give --class-noun dog/girl/backpack/... for your subject)" \
        if cfg.class_noun == "person" and "{class_noun}" in cfg.prompt else ""
    random = f": {sd.random_note}" + (" (the one model in weights/; --model chooses another)" * default_model) \
        if sd.random_note else ""
    vae, text_encoders = _family_notes(sd, hw)
    lines = [f"model       {cfg.model} ({sd.version}, {sd.prediction_type}){random}",
             f"photos      {n_images} from {cfg.images}, {setup.resolution} px"
             f"{' (aspect buckets)' * bool(setup.buckets)}, flips {'on' if cfg.flip else 'off'}"
             + (f", masks from {cfg.masks or 'name.mask.png'}" if setup.masked else ""),
             *([f"buckets     {describe_buckets(setup.buckets, setup.resolution)}"] if setup.buckets else []),
             f"learns      {setup.prompt!r}{noun}",
             f"prior       {prior}",
             f"validation  {setup.validation_prompt!r}" + (f" every {plural(cfg.validate_every, 'epoch')}"
                                                          if cfg.validate_every else " off"),
             f"training    {plural(steps, 'step')} ({plural(epochs, 'epoch')}), {'Do' if cfg.dora else 'Lo'}RA rank "
             f"{cfg.rank} on {','.join(cfg.lora_targets)}{text_encoders if cfg.train_text_encoder else ''}"
             + (f", a magnitude per {cfg.dora}put channel" if cfg.dora else "")
             + (" (peft's axis; for A1111 and ComfyUI use --dora in)" if cfg.dora == "out" else ""),
             *([f"ema         average of the LoRA, decay {cfg.ema_decay:g}: validation and lora.safetensors use it, "
                "the last step's is lora_raw.safetensors"] if cfg.ema_decay else []),
             f"optimizer   {describe_optimizer(cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.prodigy_d_coef)}",
             *([f"pivotal     new tokens {cfg.resolved_token()}, initialised from {cfg.class_noun!r}, lr "
                f"{cfg.embedding_lr or cfg.lr:g}, written to embedding.safetensors"] if cfg.pivotal else []),
             f"hardware    {hw.device}, {hw.precision}{vae}" + (f", {dist.world_size()} processes (torchrun) of "
                                                         f"batch {cfg.batch_size} each" if dist.world_size() > 1 else ""),
             f"output      {setup.run.path}"]
    return "\n".join(lines + time_lines(cfg, setup, wanted - have, steps, epochs))


def _family_notes(sd, hw):
    """(the VAE's precision when it differs from the run's, which text encoders get LoRA) for the plan."""
    vae = precision_name(next(sd.vae.parameters()).dtype)
    why = ": SDXL's VAE overflows fp16 into NaN / black images" if sd.version == "sdxl" and hw.precision == "fp16" else ""
    vae = "" if vae == hw.precision else f", VAE in {vae}{why}"
    return vae, " + both text encoders" if sd.version == "sdxl" else " + text encoder"


def plural(n, noun):
    """'1 epoch', '2 epochs', '0.5 epochs', '1500 steps'."""
    return (f"{n:g}" if isinstance(n, float) else f"{n}") + f" {noun}{'s' * (n != 1)}"


def time_lines(cfg, setup, to_draw, steps, epochs):
    """The plan's time estimate (estimate.py), and a warning when a full-size model is to train on the CPU."""
    per_latent = seconds_per_latent(setup.sd, setup.hardware, setup.resolution)
    validations = sum(cfg.is_validation_epoch(e) for e in range(int(epochs) + 1)) if cfg.validate_every or \
        cfg.eval_every else 0
    class_images, step, validation = estimate(cfg, per_latent, to_draw, validations)
    training = steps * step + validation
    lines = [f"time        about {duration(class_images) + ' for the class images, ' if to_draw else ''}"
             f"{duration(training)} for the training{' and validation' * bool(validations)} (rough: from one "
             f"timed UNet pass; the progress bars show the real rate)"]
    if cfg.compile:
        lines.append(compile_line(setup.hardware.device_type, setup.sd.version))
    if setup.hardware.device_type == "cpu" and is_full_size(setup.sd.unet):
        lines.append(f"warning: a full-size model trains on the CPU, about {duration(step)} a "
                     "step: use a GPU, or try the commands first on a tiny model (python -m dreambooth_min.formats.make_tiny)")
    return lines


def config_record(cfg, setup, model_path):
    """config.json: every setting (with the model path resolved) and what was decided from them."""
    sd = setup.sd
    return dataclasses.asdict(cfg) | {"model": str(model_path)}, {
        "model": str(model_path), "version": sd.version, "prediction_type": sd.prediction_type,
        "resolution": setup.resolution, "device": setup.hardware.device, "precision": setup.hardware.precision,
        "prompt": setup.prompt, "class_prompt": setup.class_prompt, "validation_prompt": setup.validation_prompt,
        "instance_images": len(setup.captions)}
