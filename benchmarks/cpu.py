"""Benchmarks against diffusers on the same random full-size SD 1.5 weights (not tests: nothing asserted).

    python -m benchmarks.cpu sample [--steps 20 --size 256 --repeats 2]
    python -m benchmarks.cpu train  [--size 512 --repeats 2]
    python -m benchmarks.cpu load

sample: the DDIM loop (classifier-free guidance 7.5, so UNet batch 2) and the VAE decode, ours vs diffusers'
        StableDiffusionPipeline + DDIMScheduler, prompt embeddings precomputed for both.
train:  one DreamBooth-LoRA step (rank 4 on to_q/to_k/to_v/to_out.0; batch 2 = instance + class; forward, MSE,
        backward, AdamW), ours vs diffusers' UNet + peft LoRA, with and without gradient checkpointing.
load:   peak resident memory while `load()` reads an fp16 SD 1.5 single file into fp32, over the weights' size.
Each configuration runs in a fresh subprocess (so peaks do not mix); memory is the peak resident set during
the timed work minus the resident set just before it, i.e. what the work needs beyond the weights.
Needs the test dependencies (diffusers, peft). fp32 on the CPU by default; `--device cuda --dtype fp16` too.
"""
import argparse
import json
import resource
import subprocess
import sys
import threading
import time

import torch

UNET_SD15 = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
VAE_SD15 = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


class PeakRSS:
    """Peak resident memory of this process inside a `with` block, sampled every 2 ms, minus the start."""

    @staticmethod
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    def __enter__(self):
        self.start = self.peak = self.rss()
        self.running = True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while self.running:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.rss())
        self.extra = self.peak - self.start


def cuda_peak(device, fn):
    """(result, extra peak GPU memory) of fn() on CUDA."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated() - base


def diffusers_unet(seed=0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNET_SD15).eval().requires_grad_(False)


def ours_from(diffusers_module, ours_cls, cfg):
    with torch.device("meta"):
        ours = ours_cls(cfg)
    ours.load_state_dict(diffusers_module.state_dict(), assign=True, strict=True)
    return ours.eval().requires_grad_(False)


def release_free_memory():
    """Hand freed heap memory back to the OS, so that the resident set measures live memory."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def timed(fn, device, repeats):
    """(best wall time of `repeats` calls after a warm-up, extra peak memory of the first call).

    Memory is taken on the first call: later calls reuse memory the allocator kept, which the resident
    set no longer shows as growth."""
    release_free_memory()
    if device == "cuda":
        _, extra = cuda_peak(device, fn)
    else:
        with PeakRSS() as mem:
            fn()
        extra = mem.extra
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best, extra


# ---------------------------------------------------------------------------------------------------
# One configuration per subprocess

def run_sample(tool, a):
    from diffusers import AutoencoderKL as DAutoencoderKL

    from dreambooth_min.unet import UNet2DConditionModel, UNetConfig
    from dreambooth_min.vae import AutoencoderKL, VAEConfig

    dtype = getattr(torch, a.dtype)
    unet = diffusers_unet()
    torch.manual_seed(1)
    vae = DAutoencoderKL(**VAE_SD15).eval().requires_grad_(False)
    if tool == "ours":
        unet, vae = ours_from(unet, UNet2DConditionModel, UNetConfig.sd1()), ours_from(vae, AutoencoderKL, VAEConfig())
    unet, vae = unet.to(a.device, dtype), vae.to(a.device, dtype)
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(2, 77, 768, generator=g).to(a.device, dtype)  # [uncond; cond]
    x_T = torch.randn(1, 4, a.size // 8, a.size // 8, generator=g).to(a.device)

    if tool == "ours":
        from dreambooth_min.model import StableDiffusion
        from dreambooth_min.sampling import ddim_sample, decode

        sd = StableDiffusion(unet, vae, None, None, "sd1", "epsilon")
        fn = lambda: decode(sd, ddim_sample(unet, x_T, ctx, a.steps, 7.5, progress=False))
    else:
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        fn = lambda: pipe(prompt_embeds=ctx[1:], negative_prompt_embeds=ctx[:1], latents=x_T.to(dtype),
                          num_inference_steps=a.steps, guidance_scale=7.5, height=a.size, width=a.size,
                          output_type="np").images
    with torch.inference_mode():
        return timed(fn, a.device, a.repeats)


def run_train(tool, a):
    from dreambooth_min.lora import UNET_TARGETS, inject_lora, lora_parameters
    from dreambooth_min.unet import UNet2DConditionModel, UNetConfig

    dtype = getattr(torch, a.dtype)
    unet = diffusers_unet()
    if tool.startswith("ours"):
        unet = ours_from(unet, UNet2DConditionModel, UNetConfig.sd1()).to(a.device, dtype)
        params = lora_parameters(inject_lora(unet, UNET_TARGETS, rank=4))
        unet.gradient_checkpointing = tool.endswith("+gc")
        forward = lambda x, t, c: unet(x, t, c)
    else:
        from peft import LoraConfig

        unet = unet.to(a.device, dtype)
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=list(UNET_TARGETS)))
        params = [p for p in unet.parameters() if p.requires_grad]
        for p in params:  # as diffusers' script: trainable LoRA parameters in fp32
            p.data = p.data.float()
        if tool.endswith("+gc"):
            unet.enable_gradient_checkpointing()
        forward = lambda x, t, c: unet(x, t, encoder_hidden_states=c).sample
    unet.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    scaler = torch.amp.GradScaler(a.device, enabled=a.dtype == "float16")
    g = torch.Generator().manual_seed(0)
    latent = a.size // 8
    x, noise = (torch.randn(2, 4, latent, latent, generator=g).to(a.device) for _ in range(2))
    ctx, t = torch.randn(2, 77, 768, generator=g).to(a.device, dtype), torch.tensor([10, 900], device=a.device)

    def step():
        with torch.autocast(a.device, dtype=dtype, enabled=a.dtype != "float32"):
            pred = forward(x.to(dtype), t, ctx)
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return timed(step, a.device, a.repeats)


def run_load(_tool, a):
    """Write a random fp16 SD 1.5 single file (LDM layout) once, then time and measure `load`."""
    import os

    from dreambooth_min.formats.checkpoint import load

    path = a.file
    if not os.path.exists(path):
        make_sd15_file(path)
    import transformers  # noqa: F401  (imported before measuring, as any caller would have)
    from transformers import CLIPTextModel  # noqa: F401

    release_free_memory()
    t = time.perf_counter()
    with PeakRSS() as mem:
        sd = load(path)
    weights = sum(p.numel() * p.element_size() for m in (sd.unet, sd.vae, sd.text_encoder) for p in m.parameters())
    return time.perf_counter() - t, mem.extra, weights


def make_sd15_file(path):
    """Seeded random weights with the real SD 1.5 single-file names and shapes, fp16 (as the released file)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from dreambooth_min.formats.checkpoint_names import unet_rename_table, unrename, vae_rename_table
    from dreambooth_min.formats.safetensors_io import save_atomic
    from dreambooth_min.unet import UNet2DConditionModel, UNetConfig
    from dreambooth_min.vae import AutoencoderKL, VAEConfig

    g = torch.Generator().manual_seed(0)
    tensors = {}
    text_cfg = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              hidden_act="quick_gelu")
    for prefix, cls, cfg, table in (
            ("model.diffusion_model.", UNet2DConditionModel, UNetConfig.sd1(), unet_rename_table(UNetConfig.sd1())),
            ("first_stage_model.", AutoencoderKL, VAEConfig(), vae_rename_table(VAEConfig())),
            ("cond_stage_model.transformer.text_model.", CLIPTextModel, text_cfg, None)):
        with torch.device("meta"):
            module = cls(cfg)
        for k, v in module.state_dict().items():
            name = unrename(k, table) if table else k.removeprefix("text_model.")
            shape = v.shape + ((1, 1) if ".mid.attn_1." in name and name.endswith("weight") and v.dim() == 2 else ())
            tensors[prefix + name] = (torch.randn(shape, generator=g) * 0.02).half()
    save_atomic(tensors, path)


# ---------------------------------------------------------------------------------------------------

CONFIGS = {"sample": ["ours", "diffusers"], "train": ["ours", "diffusers", "ours+gc", "diffusers+gc"], "load": ["ours"]}
RUNNERS = {"sample": run_sample, "train": run_train, "load": run_load}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=tuple(CONFIGS))
    p.add_argument("--steps", type=int, default=20, help="DDIM steps (sample)")
    p.add_argument("--size", type=int, help="image side in pixels (default: 256 sample, 512 train)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs after one warm-up; the best is kept")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--file", default="/tmp/dreambooth_min_bench_sd15.safetensors", help="load: checkpoint to write/read")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.size = a.size or (256 if a.what == "sample" else 512)
    if a.child:
        print("RESULT " + json.dumps(RUNNERS[a.what](a.child, a)))
        return
    print(f"{a.what}: {a.device} {a.dtype}, {a.size}px, torch {torch.__version__}, {torch.get_num_threads()} threads")
    results = {}
    for tool in CONFIGS[a.what]:
        cmd = [sys.executable, "-m", "benchmarks.cpu", *(argv or sys.argv[1:]), "--child", tool]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
        if not line:
            sys.exit(f"{tool} failed:\n{out.stderr[-3000:]}")
        results[tool] = json.loads(line[0][7:])
        print(f"  {tool:14s} " + ("  ".join(f"{v:.3g}" for v in results[tool])), flush=True)
    if a.what == "load":
        secs, extra, weights = results["ours"]
        print(f"load: {secs:.1f} s, peak extra memory {extra / 2**30:.2f} GiB for {weights / 2**30:.2f} GiB of fp32 "
              f"weights: {extra / weights:.3f}x (limit 1.3x)")
        return
    print(f"{'':16s}{'time s':>9s}{'peak extra GiB':>16s}{'time ratio':>12s}{'memory ratio':>14s}")
    for tool in CONFIGS[a.what]:
        ref = results[tool.replace("ours", "diffusers")]
        (s, m), (rs, rm) = results[tool], ref
        print(f"  {tool:14s}{s:9.2f}{m / 2**30:16.2f}{s / rs:12.3f}{m / rm:14.3f}")


if __name__ == "__main__":
    main()
