"""Where our UNet LoRA training step spends its time, and how far it is from the machine's FLOP limit.

    python -m benchmarks.profile [--size 512] [--batch 2]      # SD 1.5 shapes, random weights, fp32 CPU
    python -m benchmarks.profile --smoke                       # a tiny UNet (seconds; tests)

One DreamBooth-LoRA step as train.py runs it (batch 2 = instance + class, rank 4 on to_q/to_k/to_v/to_out.0,
forward, MSE, backward, gradient clipping, AdamW), after a warm-up step whose FLOPs are counted
(torch.utils.flop_counter: matrix products, convolutions, attention; forward and backward). Then one timed
step (and its peak resident memory growth), and:
  - forward, backward and optimizer are profiled apart (torch.profiler, self CPU time of each aten op) and
    summed by category: convolutions (oneDNN or im2col/GEMM, and their input gradients), matmul (linear
    layers, LoRA), attention (the SDPA kernel and its backward), norms, recomputation (the forward ops
    that memory.py redoes in backward: GroupNorm+SiLU and GEGLU), optimizer, the rest (elementwise, copies);
  - the same step without that recomputation (memory.whole_block_recomputed switches it off) gives its
    measured cost and the memory it saves;
  - the FLOP limit: the step's FLOPs / the fp32 matmul rate measured with a large torch.mm.
"""
import argparse
import time

import torch
import torch.nn.functional as F

CATEGORIES = (  # first match wins: attention before matmul, convolutions before everything that "fold"s
    ("attention", ("scaled_dot_product", "flash_attention", "efficient_attention", "_softmax")),
    ("convolution", ("conv", "mkldnn", "im2col", "col2im", "unfold", "fold")),
    ("matmul", ("mm", "matmul", "linear")),
    ("norm", ("group_norm", "layer_norm")),
    ("optimizer", ("_foreach", "adam", "lerp", "addcdiv", "addcmul")),
)
RECOMPUTED = ("aten::native_group_norm", "aten::silu", "aten::gelu", "aten::group_norm")


def category(op, phase):
    """The bucket of one aten op in phase 'forward', 'backward' or 'optimizer'."""
    if phase == "backward" and op in RECOMPUTED:
        return "recomputation"
    if phase == "optimizer":
        return "optimizer"
    name = op.lower()
    for cat, keys in CATEGORIES:
        if any(k in name for k in keys):
            return cat
    return "other"


def build(size, batch, smoke, seed=0):
    """(our UNet with rank-4 LoRA in train mode, its LoRA parameters, a step's inputs)."""
    from dreambooth_min.lora import UNET_TARGETS, inject_lora, lora_parameters
    from dreambooth_min.unet import UNet2DConditionModel, UNetConfig

    torch.manual_seed(seed)
    cfg = UNetConfig(block_out_channels=(32, 64), attention_levels=(True, False), num_attention_heads=(2, 2),
                     num_head_channels=(16, 32), cross_attention_dim=32, layers_per_block=1) if smoke \
        else UNetConfig.sd1()
    unet = UNet2DConditionModel(cfg).requires_grad_(False)
    params = lora_parameters(inject_lora(unet, UNET_TARGETS, rank=4))
    unet.train()
    g = torch.Generator().manual_seed(seed)
    latent = size // 8
    x, noise = (torch.randn(batch, 4, latent, latent, generator=g) for _ in range(2))
    ctx = torch.randn(batch, 77, cfg.cross_attention_dim, generator=g)
    t = torch.linspace(10, 900, batch).long()
    return unet, params, (x, t, ctx, noise)


def phases(unet, params, optimizer, inputs, profile=False):
    """{phase: seconds} of one step, and {phase: profiler key averages} when `profile`."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    x, t, ctx, noise = inputs
    times, tables, out = {}, {}, {}

    def forward():
        out["loss"] = F.mse_loss(unet(x, t, ctx), noise)

    def optimize():
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for phase, fn in (("forward", forward), ("backward", lambda: out["loss"].backward()), ("optimizer", optimize)):
        start = time.perf_counter()
        if profile:
            with profiler(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            tables[phase] = prof.key_averages()
        else:
            fn()
        times[phase] = time.perf_counter() - start
    return times, tables


def breakdown(tables):
    """{category: seconds} of self CPU time over the three phases."""
    total = {}
    for phase, table in tables.items():
        for e in table:
            cat = category(e.key, phase)
            total[cat] = total.get(cat, 0.0) + e.self_cpu_time_total / 1e6
    return total


def matmul_peak(n=4096, repeats=3):
    """The machine's fp32 matmul rate (GFLOP/s) on one n x n product, best of `repeats` after a warm-up."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def counted_step(unet, params, optimizer, inputs):
    """One (warm-up) step under FlopCounterMode: (forward FLOPs, backward FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    x, t, ctx, noise = inputs
    with FlopCounterMode(display=False) as fwd:
        loss = F.mse_loss(unet(x, t, ctx), noise)
    with FlopCounterMode(display=False) as bwd:
        loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return fwd.get_total_flops(), bwd.get_total_flops()


def without_recompute(unet, params, optimizer, inputs):
    """Seconds of the same step with memory.py's cheap-op recomputation off, and its peak RSS growth."""
    from benchmarks.cpu import PeakRSS, release_free_memory
    from dreambooth_min.memory import whole_block_recomputed

    release_free_memory()
    with whole_block_recomputed(), PeakRSS() as mem:  # the switch gradient checkpointing uses inside a block
        times, _ = phases(unet, params, optimizer, inputs)
    return times, mem.extra


def report(a, flops, times, tables, plain_times, plain_extra, extra, peak):
    step = sum(times.values())
    fwd, bwd = flops
    print(f"profile: our UNet LoRA step, {'tiny UNet' if a.smoke else 'SD 1.5 shapes'}, batch {a.batch} at {a.size} px, "
          f"fp32 CPU, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"step {step:.2f} s = forward {times['forward']:.2f} + backward {times['backward']:.2f} + optimizer "
          f"{times['optimizer']:.3f}; peak RSS growth {extra / 2**30:.2f} GiB")
    cats = breakdown(tables)
    total = sum(cats.values())
    print("\n| op category | seconds | share |\n| --- | --- | --- |")
    for cat, s in sorted(cats.items(), key=lambda kv: -kv[1]):
        print(f"| {cat} | {s:.2f} | {100 * s / total:.0f}% |")
    plain = sum(plain_times.values())
    print(f"\nrecomputation measured: the step without it takes {plain:.2f} s ({step - plain:+.2f} s with it) and "
          f"{plain_extra / 2**30:.2f} GiB ({(extra - plain_extra) / 2**30:+.2f} GiB with it)")
    limit = (fwd + bwd) / (peak * 1e9)
    print(f"FLOPs: forward {fwd / 1e9:.1f} G + backward {bwd / 1e9:.1f} G = {(fwd + bwd) / 1e12:.3f} TFLOP; "
          f"fp32 matmul peak {peak:.0f} GFLOP/s -> FLOP limit {limit:.2f} s; the step is {step / limit:.2f}x the limit")
    return dict(step=step, times=times, categories=cats, flops=fwd + bwd, peak_gflops=peak, limit=limit,
                without_recompute=plain, extra=extra, extra_without_recompute=plain_extra)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="a tiny UNet at 64 px")
    a = p.parse_args(argv)
    if a.smoke:
        a.size = 64
    from benchmarks.cpu import PeakRSS, release_free_memory

    peak = matmul_peak(512 if a.smoke else 4096)
    unet, params, inputs = build(a.size, a.batch, a.smoke)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    flops = counted_step(unet, params, optimizer, inputs)
    release_free_memory()
    with PeakRSS() as mem:
        times, _ = phases(unet, params, optimizer, inputs)  # timed without the profiler's overhead
    _, tables = phases(unet, params, optimizer, inputs, profile=True)
    plain_times, plain_extra = without_recompute(unet, params, optimizer, inputs)
    return report(a, flops, times, tables, plain_times, plain_extra, mem.extra, peak)


if __name__ == "__main__":
    main()
