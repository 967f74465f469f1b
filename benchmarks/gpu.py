"""The GPU speed and memory table for one DreamBooth-LoRA training step, ours against diffusers + peft.

    python -m benchmarks.gpu                 # SD 1.5 (512 px), SD 2.1-v (768 px), SDXL (1024 px): the whole table
    python -m benchmarks.gpu --models sdxl --steps 10
    python -m benchmarks.gpu --all-rows      # also fp32, fp16 with plain attention, xformers, 8-bit AdamW, sampling
    python -m benchmarks.gpu --smoke         # the same code on tiny UNets on the CPU (what the tests run)

Random weights with the real UNet shapes (nothing is downloaded): our `UNetConfig.sd1()` / `.sd2()` / `.sdxl()` and
diffusers' UNet2DConditionModel built from the same config, holding the same seeded weights. One training
step = LoRA rank 4 on to_q/to_k/to_v/to_out.0, batch 2 (instance + class latent), MSE, backward, optimizer
step (ours: AdamW as train.py makes it, fused on CUDA; diffusers + peft: torch.optim.AdamW as their script).
Rows (the default ones first), each against diffusers + peft in the same run:
  fp16 + SDPA                frozen fp16 base, fp32 LoRA, autocast fp16, GradScaler, torch's fused attention
  fp16 + SDPA + grad ckpt    gradient checkpointing (both tools)
  fp16 + SDPA + --compile    ours through torch.compile (run/hardware.compile_unet: CUDA graphs on CUDA) against
                             their eager step (`--compile-ref` compiles theirs too); the first step's time,
                             compiling included, is printed (`--compile-models` picks the models, default sd1)
  --all-rows adds: fp32; fp16 with plain (math) attention; fp16 + xformers (n/a without it); + 8-bit AdamW
  (bitsandbytes); DDIM sampling with classifier-free guidance.
Columns: steps per second over `--steps` timed steps after `--warmup`; the peak memory of the configuration
(weights, LoRA, optimizer state, activations: torch.cuda.max_memory_allocated, on the CPU the peak resident-set
growth); MFU, the step's FLOPs (torch.utils.flop_counter, forward + backward) per second over the card's dense
fp16 peak (`PEAK_TFLOPS`, or `--peak-tflops`; on the CPU the measured fp32 matmul rate).
After each model's table: a torch.profiler summary of one fp16 + SDPA step of each tool (wall time against the
device's kernel time per step, and kernels launched), and, for SD 1.5, the whole train.py loop (cached latents
and text, the NaN guard, log.jsonl, a checkpoint) in steps per second against the UNet-only step
(`--no-train-py` skips it). Needs diffusers and peft (the test dependencies).
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
from dreambooth_min.run.hardware import compile_unet
from dreambooth_min.run.optim import make_optimizer
from dreambooth_min.unet import UNet2DConditionModel, UNetConfig

# (label, precision, attention, gradient checkpointing, optimizer, torch.compile)
GOAL_ROWS = [("fp16 + SDPA", "fp16", "sdpa", False, "adamw", False),
             ("fp16 + SDPA + grad ckpt", "fp16", "sdpa", True, "adamw", False),
             ("fp16 + SDPA + --compile", "fp16", "sdpa", False, "adamw", True)]
MORE_ROWS = [("fp32", "fp32", "math", False, "adamw", False),
             ("fp16", "fp16", "math", False, "adamw", False),
             ("fp16 + xformers", "fp16", "xformers", False, "adamw", False),
             ("fp16 + SDPA + grad ckpt + 8-bit AdamW", "fp16", "sdpa", True, "adamw8bit", False)]
ROWS = GOAL_ROWS + MORE_ROWS
SAMPLE_ROW = "DDIM sampling, CFG (it/s)"
# Dense fp16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets; the first name found in
# torch.cuda.get_device_name() wins, so the more specific names come first.
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0,
               "A800": 312.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0, "T4": 65.0,
               "V100": 125.0, "RTX 4090": 165.2, "RTX 3090": 71.0}
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
    """(calls of fn() per second over `steps` calls after `warmup` untimed ones, seconds of the first call)."""
    start = time.perf_counter()
    for i in range(warmup):
        fn()
        if i == 0:
            sync(device)
            first = time.perf_counter() - start
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return steps / (time.perf_counter() - start), first if warmup else float("nan")


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


def training_step(tool, forward, params, device, precision, optimizer_name, batch):
    """One DreamBooth-LoRA step (forward, MSE, backward, optimizer step); returns the step function.
    AdamW: ours as train.py makes it (fused on CUDA), theirs as diffusers' script (torch's default there)."""
    dtype = torch.float16 if precision == "fp16" else torch.float32
    if tool == "diffusers" and optimizer_name == "adamw":
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    else:
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


def prepared_step(tool, model, row, a):
    """(unet, step function, losses) of one training configuration, compiled when the row says so."""
    _, precision, attention, checkpointing, optimizer_name, compiled = row
    cfg, pixels, weights = model
    dtype = torch.float16 if precision == "fp16" else torch.float32
    unet, forward = build(tool, cfg, pixels, weights, a.device, dtype)
    params = add_lora(tool, unet, checkpointing)
    unet.train()
    if compiled and tool == "ours":
        compile_unet(unet, a.compile_backend)
    elif compiled and a.compile_ref:
        unet.compile(backend=a.compile_backend, dynamic=False)
    step, losses = training_step(tool, forward, params, a.device, precision, optimizer_name,
                                 make_batch(cfg, pixels, a.device))
    return unet, step, losses


def train_row(tool, model, row, a):
    """{it/s, peak bytes, finite, first-step seconds} of one training configuration, or a reason string."""
    reason = unavailable(tool, row[2], row[4], a.device)
    if reason:
        return reason
    torch._dynamo.reset()  # a compiled row starts from nothing: its first step is the compile time
    with peak_memory(a.device) as mem:
        unet, step, losses = prepared_step(tool, model, row, a)
        with attention_backend(tool, unet, row[2]):
            speed, first = per_second(step, a.device, max(a.warmup, 1), a.steps)
        finite = bool(torch.isfinite(losses[-1]))
        del unet, step, losses
    return {"speed": speed, "bytes": mem["bytes"], "finite": finite, "first": first}


def step_flops(model, a):
    """FLOPs of one LoRA training step (forward + backward; torch.utils.flop_counter: matrix products,
    convolutions, attention) of our UNet in the fp16 + SDPA row; the optimizer's are negligible."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg, pixels, weights = model
    dtype = torch.float16 if a.device == "cuda" else torch.float32
    unet, forward = build("ours", cfg, pixels, weights, a.device, dtype)
    add_lora("ours", unet, False)
    unet.train()
    x, noise, t, ctx = make_batch(cfg, pixels, a.device)
    with FlopCounterMode(display=False) as counter, torch.autocast(a.device, dtype=dtype, enabled=a.device == "cuda"):
        F.mse_loss(forward(x.to(dtype), t, ctx.to(dtype=dtype)).float(), noise).backward()
    del unet, forward
    return counter.get_total_flops()


def peak_flops(a):
    """The card's dense fp16 FLOP/s (PEAK_TFLOPS or --peak-tflops); on the CPU the measured fp32 matmul rate."""
    if a.peak_tflops:
        return a.peak_tflops * 1e12
    if a.device != "cuda":
        from benchmarks.profile import matmul_peak

        return matmul_peak(256 if a.smoke else 2048) * 1e9
    name = torch.cuda.get_device_name()
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS.items() if key in name), None)


def profile_row(tool, model, a):
    """One fp16 + SDPA step under torch.profiler after the warm-up: (wall ms, device kernel ms, kernels launched)
    per step; on the CPU (ms of wall, ms of the ops' own CPU time, aten ops dispatched)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = a.device == "cuda"
    unet, step, _ = prepared_step(tool, model, GOAL_ROWS[0], a)
    steps = 3
    with attention_backend(tool, unet, "sdpa"):
        per_second(step, a.device, max(a.warmup, 1), 1)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        start = time.perf_counter()
        with profile(activities=activities) as prof:
            for _ in range(steps):
                step()
            sync(a.device)
        wall = (time.perf_counter() - start) / steps
    table = prof.key_averages()
    kind = DeviceType.CUDA if cuda else DeviceType.CPU
    mine = [e for e in table if e.device_type == kind and (cuda or e.key.startswith("aten::"))]
    busy = sum((e.self_device_time_total if cuda else e.self_cpu_time_total) for e in mine) / 1e3 / steps
    del unet, step
    return 1e3 * wall, busy, sum(e.count for e in mine) / steps


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
            runs, _ = per_second(run, a.device, 1, a.repeats)
        del unet
    return {"speed": runs * a.sample_steps, "bytes": mem["bytes"], "finite": bool(torch.isfinite(out["x"]).all())}


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


def cell(result, key, scale=1.0):
    if isinstance(result, str):
        return result
    mark = "" if result["finite"] or key != "speed" else " (non-finite loss)"
    return f"{result[key] * scale:.3g}{mark}"


def mfu(result, flops, peak):
    """The step's model FLOP utilisation, in % of the peak."""
    if isinstance(result, str) or not flops or not peak:
        return "n/a"
    return f"{100 * flops * result['speed'] / peak:.2g}%"


TABLE_HEAD = ("| configuration | ours it/s | ours peak GiB | ours MFU | diffusers+peft it/s | diffusers+peft peak GiB "
              "| diffusers+peft MFU | speed ours/ref | memory ours/ref |\n"
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")


def print_row(label, ours, ref, flops=None, peak=None):
    """One markdown row: ours vs diffusers + peft, and their ratios (printed as soon as measured)."""
    both = not isinstance(ours, str) and not isinstance(ref, str)
    speed = f"{ours['speed'] / ref['speed']:.2f}" if both else "n/a"
    memory = f"{ours['bytes'] / ref['bytes']:.2f}" if both and ref["bytes"] > 0 else "n/a"
    print(f"| {label} | {cell(ours, 'speed')} | {cell(ours, 'bytes', 2 ** -30)} | {mfu(ours, flops, peak)} "
          f"| {cell(ref, 'speed')} | {cell(ref, 'bytes', 2 ** -30)} | {mfu(ref, flops, peak)} | {speed} | {memory} |",
          flush=True)


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


def rows_for(name, cfg, a):
    rows = [r for r in GOAL_ROWS if not r[5] or name in a.compile_models.split(",")]
    return rows + (MORE_ROWS if a.all_rows and not is_sdxl(cfg) else [])


def run_model(name, models, a):
    """The model's table, row by row, then its profiler summary (and for SD 1.5 the train.py loop)."""
    title, make_cfg, pixels = models[name]
    cfg = make_cfg()
    model = (cfg, pixels, random_weights(cfg, pixels, a.device))
    flops, peak = guarded(step_flops, model, a), guarded(peak_flops, a)
    flops, peak = (None if isinstance(v, str) else v for v in (flops, peak))
    side = pixels // 8
    print(f"\n### {title} (latent {side}x{side}), LoRA rank 4, batch 2; step "
          f"{'n/a' if flops is None else f'{flops / 1e12:.3g} TFLOP'}, peak "
          f"{'n/a' if peak is None else f'{peak / 1e12:.4g} TFLOP/s'}\n\n{TABLE_HEAD}", flush=True)
    results = {}
    for row in rows_for(name, cfg, a):
        results[row[0]] = tuple(guarded(train_row, tool, model, row, a) for tool in TOOLS)
        print_row(row[0], *results[row[0]], flops, peak)
    if a.all_rows and not is_sdxl(cfg):
        results[SAMPLE_ROW] = tuple(guarded(sample_row, tool, model, a) for tool in TOOLS)
        print_row(SAMPLE_ROW, *results[SAMPLE_ROW])
    compiled = results.get(GOAL_ROWS[2][0], ("",))[0]
    if not isinstance(compiled, str):
        print(f"\n--compile: the first step took {compiled['first']:.1f} s, compiling included "
              f"(backend {a.compile_backend}{', CUDA graphs' if a.device == 'cuda' else ''})")
    print_profile(model, a)
    if name in ("sd1", "tiny-sd1") and a.train_py:
        unet_only = results[GOAL_ROWS[0][0]][0]
        print_train_py(guarded(train_py_speed, a), None if isinstance(unet_only, str) else unet_only["speed"], a)
    return results


def print_profile(model, a):
    unit = ("device kernel ms", "kernels") if a.device == "cuda" else ("aten self CPU ms", "aten ops")
    print(f"\nprofile of one fp16 + SDPA step (torch.profiler, 3 steps after the warm-up):\n\n"
          f"| tool | wall ms/step | {unit[0]}/step | busy | {unit[1]}/step |\n| --- | ---: | ---: | ---: | ---: |")
    for tool in TOOLS:
        r = guarded(profile_row, tool, model, a)
        if isinstance(r, str):
            print(f"| {tool} | {r} | | | |")
        else:
            print(f"| {tool} | {r[0]:.1f} | {r[1]:.1f} | {100 * r[1] / r[0]:.0f}% | {r[2]:.0f} |", flush=True)


def train_py_speed(a):
    """Steps per second of the whole train.py loop (train() on a random SD 1.5 folder, the photos of data/dog,
    prior preservation with pre-drawn class images, batch 1 + 1 at 512 px, fp16 on CUDA), over its last half:
    the first steps encode the latents as first drawn. One checkpoint falls in the timed half."""
    import json
    import shutil
    import tempfile
    from pathlib import Path

    from benchmarks.e2e import make_class_images, make_model_folder
    from dreambooth_min.run.config import TrainConfig
    from dreambooth_min.run.training import train

    root = Path(__file__).resolve().parents[1]
    work = Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    try:
        size, steps = (64, 6) if a.smoke else (512, a.train_py_steps)
        model = make_model_folder(work / "sd15", a.smoke)
        classes = make_class_images(work / "class", 4, size)
        train(TrainConfig(images=str(root / "data" / "dog"), model=str(model), class_noun="dog", resolution=size,
                          num_class_images=4, class_dir=str(classes), steps=steps, save_every=steps * 3 // 4,
                          validate_every=0, device=a.device, output=str(work / "run"), seed=0, compile=False),
              log=lambda *_: None)
        seconds = [json.loads(line)["seconds"] for line in (work / "run" / "log.jsonl").read_text().splitlines()]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    half = len(seconds) // 2
    return (len(seconds) - 1 - half) / (seconds[-1] - seconds[half])


def print_train_py(speed, unet_only, a):
    if isinstance(speed, str):
        print(f"\ntrain.py loop: {speed}")
        return
    gap = "" if unet_only is None or a.smoke else \
        f" against {unet_only:.3g} it/s for the UNet-only fp16 + SDPA step: {100 * (1 - speed / unet_only):+.0f}% gap"
    print(f"\ntrain.py loop (SD 1.5 random weights, data/dog, prior, 512 px, batch 1 + 1): {speed:.3g} steps/s{gap}",
          flush=True)


def describe(device):
    if device == "cuda":
        name = torch.cuda.get_device_name()
        return f"{name}, CUDA {torch.version.cuda}, torch {torch.__version__}"
    return f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}"


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="sd1,sd2,sdxl", help="comma-separated: sd1, sd2, sdxl (smoke: tiny-sd1, "
                                                             "tiny-sd2, tiny-sdxl)")
    p.add_argument("--steps", type=int, default=0, help="timed training steps per configuration (0: 10; SDXL 5)")
    p.add_argument("--warmup", type=int, default=0, help="untimed steps first (kernels, allocator, GradScaler; "
                                                         "0: 3; SDXL 2)")
    p.add_argument("--all-rows", action="store_true", help="also fp32, fp16 math attention, xformers, 8-bit AdamW "
                                                           "and DDIM sampling")
    p.add_argument("--compile-models", default="sd1", help="models that get the --compile row (compiling takes "
                                                          "minutes each: sd1 alone keeps the table under 8 minutes)")
    p.add_argument("--compile-ref", action="store_true", help="compile diffusers' UNet too in the --compile row")
    p.add_argument("--compile-backend", default="inductor", help=argparse.SUPPRESS)
    p.add_argument("--peak-tflops", type=float, default=0.0, help="the card's dense fp16 peak (default: PEAK_TFLOPS)")
    p.add_argument("--no-train-py", dest="train_py", action="store_false", help="skip the whole train.py loop")
    p.add_argument("--train-py-steps", type=int, default=40, help="steps of the train.py loop")
    p.add_argument("--sample-steps", type=int, default=20, help="DDIM steps of the sampling row")
    p.add_argument("--repeats", type=int, default=2, help="timed DDIM runs after one untimed run")
    p.add_argument("--smoke", action="store_true", help="tiny UNets on the CPU, few steps: checks the code runs")
    a = p.parse_args(argv)
    a.device = "cpu" if a.smoke else "cuda"
    if a.smoke:
        a.steps, a.warmup, a.sample_steps, a.repeats, a.all_rows = 2, 1, 3, 1, True
        a.compile_backend = "aot_eager"  # traces forward and backward as inductor would, without its C++ build
        torch.set_num_threads(1)  # tiny tensors: more threads only wait on each other
        if a.models == "sd1,sd2,sdxl":
            a.models = ",".join(SMOKE_MODELS)
        if a.compile_models == "sd1":
            a.compile_models = "tiny-sd1"
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
    print(f"LoRA training step, ours vs diffusers + peft: {describe(a.device)}")
    import diffusers  # noqa: F401  (then freeze: the collections between rows scan only what the rows made)
    import peft  # noqa: F401

    gc.freeze()
    start = time.perf_counter()
    for name in names:
        steps, warmup = a.steps, a.warmup
        sdxl = is_sdxl(models[name][1]())
        a.steps, a.warmup = steps or (5 if sdxl else 10), warmup or (2 if sdxl else 3)
        run_model(name, models, a)
        a.steps, a.warmup = steps, warmup
    print(f"\nwhole table: {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
