"""The GPU speed and memory table for one DreamBooth-LoRA training step, ours against diffusers + peft.

    python -m benchmarks.gpu                 # SD 1.5 (512 px), SD 2.1-v (768 px) and SDXL (1024 px) UNets, on CUDA
    python -m benchmarks.gpu --models sdxl --steps 10
    python -m benchmarks.gpu --smoke         # the same code on tiny UNets on the CPU (what the tests run)

Random weights with the real UNet shapes (nothing is downloaded): our `UNetConfig.sd1()` / `.sd2()` and
diffusers' UNet2DConditionModel built from the same config, holding the same seeded weights. One training
step = LoRA rank 4 on to_q/to_k/to_v/to_out.0, batch 2 (instance + class latent), MSE, backward, optimizer
step. Rows, each adding to the fp16 setting of the seed's table:
  fp32                       fp32 base and LoRA, plain (math) attention
  fp16                       frozen fp16 base, fp32 LoRA, autocast fp16, GradScaler; plain (math) attention
  fp16 + SDPA                torch's fused scaled_dot_product_attention (flash / memory-efficient kernels)
  fp16 + xformers            xformers' memory_efficient_attention (n/a when xformers is not installed)
  fp16 + SDPA + grad ckpt    gradient checkpointing
  ... + 8-bit AdamW          bitsandbytes' AdamW8bit (n/a without bitsandbytes or CUDA)
and DDIM sampling (classifier-free guidance: UNet batch 2) in fp16 + SDPA (fp32 on the CPU). The SDXL UNet
(2.6 G parameters, latent 128 x 128, conditioned on the pooled text and six size ids besides the text states)
gets the rows that fit a 24-80 GiB card, `SDXL_ROWS`: fp16 + SDPA without and with gradient checkpointing.
Columns: steps (or DDIM iterations) per second over `--steps` timed steps after `--warmup`, and the peak
memory of the whole configuration (weights, LoRA, optimizer state, activations): torch.cuda.max_memory_allocated
on CUDA, the peak resident-set growth on the CPU. Needs diffusers and peft (the test dependencies).
"""
import argparse
import contextlib
import gc
import importlib.util
import time
import traceback

import torch
import torch.nn.functional as F

from benchmarks.cpu import PeakRSS, ours_from, release_free_memory
from dreambooth_min import layers
from dreambooth_min.lora import UNET_TARGETS, inject_lora, lora_parameters
from dreambooth_min.run.optim import make_optimizer
from dreambooth_min.unet import UNet2DConditionModel, UNetConfig

# (label, precision, attention, gradient checkpointing, optimizer)
ROWS = [("fp32", "fp32", "math", False, "adamw"),
        ("fp16", "fp16", "math", False, "adamw"),
        ("fp16 + SDPA", "fp16", "sdpa", False, "adamw"),
        ("fp16 + xformers", "fp16", "xformers", False, "adamw"),
        ("fp16 + SDPA + grad ckpt", "fp16", "sdpa", True, "adamw"),
        ("fp16 + SDPA + grad ckpt + 8-bit AdamW", "fp16", "sdpa", True, "adamw8bit")]
SDXL_ROWS = [row for row in ROWS if row[0] in ("fp16 + SDPA", "fp16 + SDPA + grad ckpt")]
SAMPLE_ROW = "DDIM sampling, CFG (it/s)"
TOOLS = ("ours", "diffusers")


def tiny_config(sd2=False, sdxl=False):
    """A two-level UNet with SD's topology (attention, then none; SDXL: none, then two transformer blocks),
    small enough for a CPU test."""
    if sdxl:
        return UNetConfig(block_out_channels=(32, 64), attention_levels=(False, True), num_attention_heads=(1, 2),
                          num_head_channels=(32, 32), cross_attention_dim=64, use_linear_projection=True,
                          layers_per_block=1, transformer_layers_per_block=(1, 2), addition_embed_type="text_time",
                          addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8)
    if sd2:
        return UNetConfig(block_out_channels=(32, 64), attention_levels=(True, False), num_attention_heads=(1, 2),
                          num_head_channels=(32, 32), cross_attention_dim=64, use_linear_projection=True,
                          upcast_attention=True, layers_per_block=1)
    return UNetConfig(block_out_channels=(32, 64), attention_levels=(True, False), num_attention_heads=(2, 2),
                      num_head_channels=(16, 32), cross_attention_dim=32, layers_per_block=1)


# name: (title, config, image side in pixels)
MODELS = {"sd1": ("SD 1.5 UNet, 512 px", UNetConfig.sd1, 512),
          "sd2": ("SD 2.1-v UNet, 768 px", UNetConfig.sd2, 768),
          "sdxl": ("SDXL UNet, 1024 px", UNetConfig.sdxl, 1024)}
SMOKE_MODELS = {"tiny-sd1": ("tiny SD1-like UNet, 64 px", tiny_config, 64),
                "tiny-sd2": ("tiny SD2-like UNet, 64 px", lambda: tiny_config(sd2=True), 64),
                "tiny-sdxl": ("tiny SDXL-like UNet, 64 px", lambda: tiny_config(sdxl=True), 64)}


def is_sdxl(cfg):
    return cfg.addition_embed_type == "text_time"


def diffusers_config(cfg, sample_size):
    """diffusers UNet2DConditionModel kwargs for our UNetConfig (its `attention_head_dim` is the head count)."""
    sdxl = dict(addition_embed_type="text_time", addition_time_embed_dim=cfg.addition_time_embed_dim,
                projection_class_embeddings_input_dim=cfg.projection_class_embeddings_input_dim) if is_sdxl(cfg) else {}
    return sdxl | dict(sample_size=sample_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
                down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels),
                up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels)),
                attention_head_dim=cfg.num_attention_heads, cross_attention_dim=cfg.cross_attention_dim,
                use_linear_projection=cfg.use_linear_projection, upcast_attention=cfg.upcast_attention,
                norm_num_groups=cfg.norm_num_groups, transformer_layers_per_block=cfg.transformer_layers_per_block)


def random_weights(cfg, pixels, device, seed=0):
    """Seeded random diffusers UNet weights (default init, built on `device` for speed), kept on the CPU."""
    from diffusers import UNet2DConditionModel as DiffusersUNet

    torch.manual_seed(seed)
    with torch.device(device):
        unet = DiffusersUNet(**diffusers_config(cfg, pixels // 8))
    return {k: v.detach().cpu() for k, v in unet.state_dict().items()}


def build(tool, cfg, pixels, weights, device, dtype):
    """(frozen UNet in `dtype` on `device`, forward(x, t, context) -> prediction)."""
    from diffusers import UNet2DConditionModel as DiffusersUNet

    with torch.device("meta"):
        unet = DiffusersUNet(**diffusers_config(cfg, pixels // 8))
    unet.load_state_dict({k: v.to(device, dtype) for k, v in weights.items()}, assign=True, strict=True)
    unet = unet.eval().requires_grad_(False)
    if tool == "ours":
        unet = ours_from(unet, UNet2DConditionModel, cfg)
        return unet, lambda x, t, c: unet(x, t, c)
    if is_sdxl(cfg):  # the pooled text and the size ids go in as diffusers' added_cond_kwargs
        return unet, lambda x, t, c: unet(x, t, encoder_hidden_states=c.context,
                                          added_cond_kwargs={"text_embeds": c.pooled, "time_ids": c.time_ids}).sample
    return unet, lambda x, t, c: unet(x, t, encoder_hidden_states=c).sample


def add_lora(tool, unet, checkpointing):
    """Rank-4 LoRA on the attention projections (fp32 factors, whatever the base's dtype); its parameters."""
    if tool == "ours":
        unet.gradient_checkpointing = checkpointing
        return lora_parameters(inject_lora(unet, UNET_TARGETS, rank=4))
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=list(UNET_TARGETS)))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:  # as diffusers' train_dreambooth_lora.py: trainable parameters in fp32
        p.data = p.data.float()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    return params


def unavailable(tool, attention, optimizer, device):
    """Why a row cannot run here (None: it can)."""
    if attention == "xformers":
        if device != "cuda":
            return "n/a (CUDA only)"
        if (layers._xops if tool == "ours" else importlib.util.find_spec("xformers")) is None:
            return "n/a (no xformers)"
    if optimizer == "adamw8bit":
        if device != "cuda":
            return "n/a (CUDA only)"
        if importlib.util.find_spec("bitsandbytes") is None:
            return "n/a (no bitsandbytes)"
    return None


@contextlib.contextmanager
def attention_backend(tool, unet, attention):
    """math: plain softmax(QK^T)V; sdpa: torch's fused kernels; xformers: xformers' kernel (both tools)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    saved = layers.USE_XFORMERS
    layers.USE_XFORMERS = attention == "xformers"  # read by layers.attention() at every call
    if attention == "xformers" and tool == "diffusers":
        unet.enable_xformers_memory_efficient_attention()
    kernels = [SDPBackend.MATH] if attention == "math" else \
        [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]
    try:
        with sdpa_kernel(kernels):
            yield
    finally:
        layers.USE_XFORMERS = saved


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def per_second(fn, device, warmup, steps):
    """Calls of fn() per second over `steps` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return steps / (time.perf_counter() - start)


@contextlib.contextmanager
def peak_memory(device):
    """Yields a dict whose "bytes" is, on exit, the peak memory inside the block (see the module doc)."""
    result = {}
    if device == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        yield result
        sync(device)
        result["bytes"] = torch.cuda.max_memory_allocated()
    else:
        release_free_memory()
        with PeakRSS() as mem:
            yield result
        result["bytes"] = mem.extra


def training_step(forward, params, device, precision, optimizer_name, batch):
    """One DreamBooth-LoRA step (forward, MSE, backward, optimizer step); returns the step function."""
    dtype = torch.float16 if precision == "fp16" else torch.float32
    optimizer = make_optimizer([{"params": params, "lr": 1e-4}], optimizer_name, weight_decay=1e-2)
    scaler = torch.amp.GradScaler(device, enabled=precision == "fp16")
    x, noise, t, ctx = batch
    losses = []

    def step():
        with torch.autocast(device, dtype=dtype, enabled=precision != "fp32"):
            pred = forward(x.to(dtype), t, ctx.to(dtype=dtype))
        loss = F.mse_loss(pred.float(), noise)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    return step, losses


def make_batch(cfg, pixels, device, seed=0):
    """Instance + class latents, their noise, two timesteps and two text contexts (batch 2); SDXL: a Cond that
    adds the pooled text and each row's size ids (a 3:2 photo, then an uncropped class image)."""
    g = torch.Generator().manual_seed(seed)
    side = pixels // 8
    x, noise = (torch.randn(2, cfg.in_channels, side, side, generator=g).to(device) for _ in range(2))
    ctx = torch.randn(2, 77, cfg.cross_attention_dim, generator=g).to(device)
    if is_sdxl(cfg):
        from dreambooth_min.conditioning import Cond
        from dreambooth_min.run.data import photo_time_ids

        pooled = torch.randn(2, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim,
                             generator=g)
        ctx = Cond(ctx, pooled.to(device), photo_time_ids([(1536, 1024), (pixels, pixels)], pixels).to(device))
    return x, noise, torch.tensor([10, 900], device=device), ctx


def train_row(tool, model, row, a):
    """(steps per second, peak bytes, last loss finite) of one training configuration, or a reason string."""
    _, precision, attention, checkpointing, optimizer_name = row
    reason = unavailable(tool, attention, optimizer_name, a.device)
    if reason:
        return reason
    cfg, pixels, weights = model
    dtype = torch.float16 if precision == "fp16" else torch.float32
    with peak_memory(a.device) as mem:
        unet, forward = build(tool, cfg, pixels, weights, a.device, dtype)
        params = add_lora(tool, unet, checkpointing)
        unet.train()
        step, losses = training_step(forward, params, a.device, precision, optimizer_name,
                                     make_batch(cfg, pixels, a.device))
        with attention_backend(tool, unet, attention):
            speed = per_second(step, a.device, a.warmup, a.steps)
        finite = bool(torch.isfinite(losses[-1]))
        del unet, forward, params, step, losses
    return speed, mem["bytes"], finite


def sample_row(tool, model, a):
    """(DDIM iterations per second with classifier-free guidance, peak bytes, output finite)."""
    from dreambooth_min.sampling import ddim_sample

    cfg, pixels, weights = model
    dtype = torch.float16 if a.device == "cuda" else torch.float32
    x_T, _, _, ctx = make_batch(cfg, pixels, a.device)
    x_T, ctx = x_T[:1], ctx.to(dtype)  # one image; ctx = [uncond; cond]
    out = {}
    with peak_memory(a.device) as mem, torch.inference_mode():
        unet, _ = build(tool, cfg, pixels, weights, a.device, dtype)
        if tool == "ours":
            run = lambda: out.update(x=ddim_sample(unet, x_T, ctx, a.sample_steps, 7.5, progress=False))
        else:
            run = lambda: out.update(x=diffusers_ddim(unet, x_T, ctx, a.sample_steps, 7.5))
        with attention_backend(tool, unet, "sdpa"):
            runs = per_second(run, a.device, 1, a.repeats)
        del unet
    return runs * a.sample_steps, mem["bytes"], bool(torch.isfinite(out["x"]).all())


def diffusers_ddim(unet, x_T, ctx, steps, guidance):
    """diffusers' StableDiffusionPipeline denoising loop (DDIMScheduler, CFG), without text encoder and VAE."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    scheduler.set_timesteps(steps, device=x_T.device)
    x = x_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(torch.cat([x, x]), t).to(unet.dtype)
        uncond, cond = unet(inp, t, encoder_hidden_states=ctx).sample.float().chunk(2)
        x = scheduler.step(uncond + guidance * (cond - uncond), t, x).prev_sample
    return x


def fmt(result, index, scale=1.0):
    if isinstance(result, str):
        return result
    mark = "" if result[2] else " (non-finite loss)"
    return f"{result[index] * scale:.3g}{mark if index == 0 else ''}"


def print_table(title, results):
    """A markdown table: one row per configuration, ours vs diffusers + peft, and their ratios."""
    print(f"\n### {title}\n")
    print("| configuration | ours it/s | ours peak GiB | diffusers+peft it/s | diffusers+peft peak GiB "
          "| speed ours/ref | memory ours/ref |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, (ours, ref) in results.items():
        both = not isinstance(ours, str) and not isinstance(ref, str)
        speed = f"{ours[0] / ref[0]:.2f}" if both else "n/a"
        memory = f"{ours[1] / ref[1]:.2f}" if both and ref[1] > 0 else "n/a"
        print(f"| {label} | {fmt(ours, 0)} | {fmt(ours, 1, 2 ** -30)} | {fmt(ref, 0)} | {fmt(ref, 1, 2 ** -30)} "
              f"| {speed} | {memory} |", flush=True)


def guarded(fn, *args):
    """fn(*args), or a short reason when it runs out of memory or fails: one row must not sink the table
    (the traceback goes to stderr; the smoke test fails on any such row, as it wants numbers)."""
    try:
        return fn(*args)
    except torch.OutOfMemoryError:
        return "out of memory"
    except Exception as e:  # noqa: BLE001  (a broken xformers / bitsandbytes build, a kernel without support)
        traceback.print_exc()
        return f"failed: {type(e).__name__}"
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_model(name, models, a):
    title, make_cfg, pixels = models[name]
    cfg = make_cfg()
    model = (cfg, pixels, random_weights(cfg, pixels, a.device))
    results = {}
    for row in SDXL_ROWS if is_sdxl(cfg) else ROWS:
        results[row[0]] = tuple(guarded(train_row, tool, model, row, a) for tool in TOOLS)
    if not is_sdxl(cfg):
        results[SAMPLE_ROW] = tuple(guarded(sample_row, tool, model, a) for tool in TOOLS)
    side = pixels // 8
    sampling = "" if is_sdxl(cfg) else f"; DDIM {a.sample_steps} steps"
    print_table(f"{title} (latent {side}x{side}), LoRA rank 4, batch 2{sampling}", results)
    return results


def describe(device):
    if device == "cuda":
        name = torch.cuda.get_device_name()
        return f"{name}, CUDA {torch.version.cuda}, torch {torch.__version__}"
    return f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}"


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="sd1,sd2,sdxl", help="comma-separated: sd1, sd2, sdxl (smoke: tiny-sd1, "
                                                             "tiny-sd2, tiny-sdxl)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per configuration")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (kernels, allocator, GradScaler)")
    p.add_argument("--sample-steps", type=int, default=20, help="DDIM steps of the sampling row")
    p.add_argument("--repeats", type=int, default=2, help="timed DDIM runs after one untimed run")
    p.add_argument("--smoke", action="store_true", help="tiny UNets on the CPU, few steps: checks the code runs")
    a = p.parse_args(argv)
    if a.smoke:
        a.device, a.steps, a.warmup, a.sample_steps, a.repeats = "cpu", 2, 1, 3, 1
        torch.set_num_threads(1)  # tiny tensors: more threads only wait on each other
        if a.models == "sd1,sd2,sdxl":
            a.models = ",".join(SMOKE_MODELS)
    else:
        a.device = "cuda"
    return a


def main(argv=None):
    a = parse(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print(f"benchmarks.gpu: no CUDA device here (torch {torch.__version__}); nothing measured "
              "(--smoke runs the same code on tiny models on the CPU)")
        return 0
    models = SMOKE_MODELS if a.smoke else MODELS
    names = [n.strip() for n in a.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in models]
    if unknown:
        raise SystemExit(f"error: unknown model {unknown[0]!r}; choose from {', '.join(models)}")
    print(f"LoRA training step and DDIM sampling, ours vs diffusers + peft: {describe(a.device)}; "
          f"{a.steps} timed steps after {a.warmup}")
    import diffusers  # noqa: F401  (then freeze: the collections between rows scan only what the rows made)
    import peft  # noqa: F401

    gc.freeze()
    for name in names:
        run_model(name, models, a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
