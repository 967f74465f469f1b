"""Our `lora_tools.py resize` against kohya sd-scripts' networks/resize_lora.py on the same LoRA (not a test).

    git --git-dir=<sd-scripts>/.git show HEAD:networks/resize_lora.py > /tmp/kohya_resize_lora.py
    python benchmarks/kohya_resize.py /tmp/kohya_resize_lora.py

The LoRA is a tiny SD 1.x's (attention, text encoder and LoCon convolutions, rank 8) with random factors whose
up columns decay geometrically, so that the dynamic methods pick different ranks per module. kohya's module is
run as it is (resize_lora_model), with its `library` imports stubbed: only torch, numpy, safetensors and tqdm run.
"""
import importlib.util
import sys
import types

import torch

from dreambooth_min.formats.lora_file import lora_state_dict, module_groups
from dreambooth_min.formats.lora_svd import group_update, resize_lora
from dreambooth_min.formats.make_tiny import build_tiny
from dreambooth_min.lora import CONV_TARGETS, TEXT_TARGETS, UNET_TARGETS, inject_lora

# (rank, conv rank, method, value). kohya gives every 4-D module (1x1 convs too) its conv rank, though its help
# says "Conv2d 3x3"; ours, as its extract_lora_from_models.py and its LoRA network, only k x k convolutions.
CASES = ((4, 4, None, None), (4, 2, None, None), (8, 8, "sv_fro", 0.9), (8, 8, "sv_ratio", 4.0),
         (8, 8, "sv_cumulative", 0.7), (8, 8, "sv_fro", 0.99))


def kohya_module(path):
    library = types.ModuleType("library")
    for name in ("train_util", "model_util", "utils"):
        setattr(library, name, types.ModuleType(f"library.{name}"))
        sys.modules[f"library.{name}"] = getattr(library, name)
    library.utils.setup_logging = lambda *a, **k: None
    sys.modules["library"] = library
    spec = importlib.util.spec_from_file_location("kohya_resize_lora", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def decaying_lora(rank=8, seed=0):
    unet, _, text = build_tiny("sd1", seed)
    loras = inject_lora(unet, UNET_TARGETS + CONV_TARGETS, rank, alpha=4.0)
    text_loras = inject_lora(text, TEXT_TARGETS, rank, alpha=4.0)
    g = torch.Generator().manual_seed(seed)
    for i, m in enumerate([*loras.values(), *text_loras.values()]):
        decay = 0.3 + 0.6 * (i % 5) / 4  # 0.3 .. 0.9: a different spectrum per module
        down = m.lora_down.weight
        down.data = torch.randn(down.shape, generator=g) / down[0].numel() ** 0.5
        up = torch.randn(m.lora_up.weight.shape, generator=g)
        m.lora_up.weight.data = up * decay ** torch.arange(rank).view(1, rank, *[1] * (up.dim() - 2))
    return lora_state_dict(loras, text_loras)


def main(path):
    kohya = kohya_module(path)
    tensors = decaying_lora()
    for rank, conv_rank, method, value in CASES:
        theirs, _, _ = kohya.resize_lora_model(dict(tensors), rank, conv_rank, torch.float32, "cpu", method, value,
                                               False)
        ours, rows = resize_lora(tensors, {}, rank, conv_rank, method, value, progress=False)
        a, b = module_groups(theirs), module_groups(ours)
        same_rank = sum(a[k]["down"].shape[0] == b[k]["down"].shape[0] for k in a)
        same_alpha = sum(abs(float(a[k]["alpha"]) - float(b[k]["alpha"])) < 1e-6 for k in a)
        update = lambda g: group_update(g, float(g["alpha"]) / g["down"].shape[0])
        diff = max(float((update(a[k]) - update(b[k])).abs().max() / update(a[k]).abs().max()) for k in a)
        ranks = sorted({r[2] for r in rows})
        one_by_one = sum(g["down"].dim() == 4 and g["down"].shape[2:] == (1, 1) for g in a.values())
        print(f"{method or 'fixed'} {value if value is not None else rank} (conv {conv_rank}): {len(a)} modules "
              f"({one_by_one} 1x1 convs), same rank {same_rank}, "
              f"same alpha {same_alpha}, ranks used {ranks}, max |dW ours - dW kohya| / max |dW kohya| {diff:.1e}")


if __name__ == "__main__":
    main(sys.argv[1])
