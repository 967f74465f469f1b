"""Per-op overhead of one LoRA training step on the CUDA code path, counted on any machine (no GPU needed).

    python -m benchmarks.overhead            # the tiny SD1 UNet of tests/tiny.py, ours vs diffusers + peft

On a GPU the training step of SD at 512 px is overhead-bound (a 2.7-TFLOP step at 4 it/s uses ~1% of an
H200): every aten op is a kernel launch and some microseconds of Python and dispatch. So this counts, for
one step (rank-4 LoRA on to_q/to_k/to_v/to_out.0, batch 2, MSE, backward, AdamW as on CUDA), the aten ops
dispatched in the forward pass, the backward pass and the optimizer step (a TorchDispatchMode sees every op
below autograd, as a GPU would launch it), and the step's wall time per op (the Python and dispatch cost of
one op, since the tiny model's arithmetic is negligible). The CPU-only paths (convolution as GEMM, the
cheap-op recomputation) are switched off: `memory.cuda_code_path()`.
"""
import argparse
import time
from collections import Counter

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from dreambooth_min import memory
from dreambooth_min.lora import UNET_TARGETS, inject_lora, lora_parameters
from dreambooth_min.run.optim import make_optimizer
from dreambooth_min.unet import UNet2DConditionModel, UNetConfig

_SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2")  # read a device value back


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched inside the block (by overload name), and those that sync the host."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self):
        return sum(self.ops.values())

    @property
    def syncs(self):
        return sum(n for name, n in self.ops.items() if name.split(".")[0] in _SYNC_OPS)


def tiny_unets(diffusers_kwargs, seed=0):
    """(ours, diffusers') frozen fp32 UNets with the same seeded weights, from diffusers' config kwargs."""
    from diffusers import UNet2DConditionModel as DiffusersUNet

    torch.manual_seed(seed)
    ref = DiffusersUNet(**diffusers_kwargs).eval().requires_grad_(False)
    ours = UNet2DConditionModel(UNetConfig.from_diffusers(dict(ref.config)))
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours.eval().requires_grad_(False), ref


def lora_step(tool, unet, batch, compiled=None):
    """(step function (phase -> None) for each phase, its LoRA parameters) of a rank-4 LoRA training step.

    The optimizer is what each tool gets on CUDA: ours fused AdamW (run/optim.py), diffusers' script
    torch.optim.AdamW, whose default there is foreach."""
    if tool == "ours":
        params = lora_parameters(inject_lora(unet, UNET_TARGETS, rank=4))
        forward = compiled or (lambda x, t, c: unet(x, t, c))
        optimizer = make_optimizer([{"params": params, "lr": 1e-4}], "adamw", fused=True)
    else:
        from peft import LoraConfig

        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=list(UNET_TARGETS)))
        params = [p for p in unet.parameters() if p.requires_grad]
        forward = lambda x, t, c: unet(x, t, encoder_hidden_states=c).sample
        optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    unet.train()
    x, noise, t, ctx = batch
    out = {}

    def forward_phase():
        out["loss"] = F.mse_loss(forward(x, t, ctx).float(), noise)

    def optimizer_phase():
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return {"forward": forward_phase, "backward": lambda: out["loss"].backward(), "optimizer": optimizer_phase}, params


def tiny_batch(cfg_in, side, context_dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, noise = (torch.randn(2, cfg_in, side, side, generator=g) for _ in range(2))
    return x, noise, torch.tensor([10, 900]), torch.randn(2, 77, context_dim, generator=g)


def measure(tool, diffusers_kwargs, repeats=5):
    """{phase: ops}, total ops, syncs, and the median step's seconds per op, on the CUDA code path."""
    ours, ref = tiny_unets(diffusers_kwargs)
    unet = ours if tool == "ours" else ref
    batch = tiny_batch(diffusers_kwargs.get("in_channels", 4), diffusers_kwargs.get("sample_size", 8),
                       diffusers_kwargs["cross_attention_dim"])
    with memory.cuda_code_path():
        phases, _ = lora_step(tool, unet, batch)
        for fn in phases.values():  # warm-up: the optimizer's state, lazy inits
            fn()
        counts = {}
        for name, fn in phases.items():
            with OpCounter() as c:
                fn()
            counts[name] = c
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for fn in phases.values():
                fn()
            times.append(time.perf_counter() - start)
    total = sum(c.total for c in counts.values())
    return dict(ops={k: c.total for k, c in counts.items()}, total=total, syncs=sum(c.syncs for c in counts.values()),
                seconds=sorted(times)[len(times) // 2], per_op=sorted(times)[len(times) // 2] / total,
                top={k: c.ops.most_common(8) for k, c in counts.items()})


def report(results):
    # scalar reads: .item() / nonzero, a host sync for a GPU tensor (torch's AdamW keeps its step counts on the
    # CPU unless fused: diffusers' 352 are those, not syncs)
    print("| tool | forward ops | backward ops | optimizer ops | total | scalar reads | step ms | us per op |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for tool, r in results.items():
        o = r["ops"]
        print(f"| {tool} | {o['forward']} | {o['backward']} | {o['optimizer']} | {r['total']} | {r['syncs']} "
              f"| {1e3 * r['seconds']:.1f} | {1e6 * r['per_op']:.1f} |")
    ours, ref = results["ours"], results["diffusers+peft"]
    print(f"ops ours / diffusers+peft: {ours['total'] / ref['total']:.3f}; "
          f"time: {ours['seconds'] / ref['seconds']:.3f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=15, help="timed steps (the median is printed)")
    p.add_argument("--top", action="store_true", help="also print each phase's most frequent ops")
    a = p.parse_args(argv)
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny import SD1_UNET  # the tests' tiny SD1 UNet: the same model the tests count

    torch.set_num_threads(1)
    results = {tool: measure(tool, SD1_UNET, a.repeats) for tool in ("ours", "diffusers+peft")}
    report(results)
    if a.top:
        for tool, r in results.items():
            for phase, top in r["top"].items():
                print(f"{tool} {phase}: " + ", ".join(f"{k} {n}" for k, n in top))
    return results


if __name__ == "__main__":
    main()
