"""A rough time estimate for the plan, from one timed UNet pass on this device at this size.

Nearly all of a run's time is UNet passes: a class image is `--class-steps` passes of a batch of 2 (the
prompt and the empty prompt of classifier-free guidance), a validation image likewise, and a training step
is a forward and a backward pass of 2 x --batch-size latents (instance + class) per micro-batch. So one
pass of one latent, timed here, scaled by the number of latents each phase runs through, gives the
estimate. Scaling by the batch is exact on the CPU and pessimistic on a GPU (larger batches use it better);
the VAE, the text encoder and the optimizer are left out. It is an estimate: the progress bars give the
measured rate once the work runs.
"""
import time

import torch

FULL_SIZE = 100_000_000  # UNet parameters: SD 1.x / 2.x have ~860M; make_tiny's and the tests' under 3M
# A LoRA training step of a batch costs about this many no-gradient passes of that batch: the backward pass
# of a frozen base computes input gradients only, about the forward's FLOPs (the README's profile of SD 1.5
# at 512 px: forward 1.36 + backward 1.32 TFLOP), and a step keeps activations, which a no-gradient pass does
# not: 3 rather than 2, on the safe side. Gradient checkpointing recomputes the forward (README: ~30% more).
STEP_PASSES, CHECKPOINTING = 3.0, 1.3


def is_full_size(unet):
    return sum(p.numel() for p in unet.parameters()) >= FULL_SIZE


@torch.no_grad()
def seconds_per_latent(sd, hardware, resolution):
    """Seconds of one UNet pass over one latent at `resolution` px, without gradients. A first pass also pays
    for one-time set-up (kernel selection, allocation), so two more are timed: on CUDA always, on the CPU when
    the first was quick (a full-size model's first pass takes seconds, and set-up is a small part of it)."""
    unet, side = sd.unet, resolution // 8
    weight = unet.conv_in.weight
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, unet.config.in_channels, side, side, generator=g).to(weight.device, weight.dtype)
    # the model's own conditioning (SDXL's UNet also needs pooled text and size ids), of an empty prompt
    cond = sd.sampling_conds("", "", resolution, resolution)[1].to(weight.device, weight.dtype)
    cuda = hardware.device_type == "cuda"
    times = []
    for _ in range(3):
        if cuda:
            torch.cuda.synchronize(hardware.device)
        start = time.perf_counter()
        with hardware.autocast():
            unet(x, 500, cond)
        if cuda:
            torch.cuda.synchronize(hardware.device)
        times.append(time.perf_counter() - start)
        if not cuda and times[-1] > 1:
            break
    return min(times[1:] or times)  # the quickest: a busy machine only adds time


def duration(seconds):
    """'40 s', '12 min', '3.5 h' (rounded: an estimate)."""
    if seconds < 90:
        return f"{max(seconds, 1):.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def estimate(cfg, per_latent, to_draw, validations):
    """Seconds of (the class images to draw, one training step, the validations), from `per_latent`."""
    class_images = to_draw * cfg.class_steps * 2 * per_latent
    latents = cfg.batch_size * (2 if cfg.use_prior else 1) * cfg.grad_accum
    step = latents * per_latent * STEP_PASSES * (CHECKPOINTING if cfg.gradient_checkpointing else 1)
    return class_images, step, validations * cfg.validation_images * cfg.validation_steps * 2 * per_latent


def compile_line(device_type, version):
    """The plan's line for --compile: the first step compiles the UNet's forward and backward (hardware.compile_unet).
    Full-size times are inductor's usual ones on a GPU, not yet measured here (docs/gpu.md); the run prints the
    first step's real time."""
    if device_type != "cuda":  # inductor writes and builds C++ kernels: 13 min for the tests' tiny UNet on 2 busy cores
        return ("compile     the UNet with torch.compile (inductor): the first step includes compiling, which takes "
                "minutes on a CPU even for a small model; its time is printed")
    typical = "3-5 min" if version == "sdxl" else "1-2 min"
    return (f"compile     the UNet with torch.compile (CUDA graphs): the first step includes compiling, typically "
            f"{typical} at full size on a GPU; its time is printed")
