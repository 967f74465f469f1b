"""Our DoRA files in ComfyUI's and AUTOMATIC1111's own code: do they patch the same weights as our apply_lora?

    python -m benchmarks.dora_clients --comfyui PATH/ComfyUI --a1111 PATH/stable-diffusion-webui
    python -m benchmarks.dora_clients ... --model MODEL --lora FILE[:STRENGTH]   # a DoRA of yours (e.g. train.py's)

Neither program can be imported (each needs its whole app) nor copied here, so this script reads, from a checkout
(or a copy of the one file), the code each applies a DoRA with, and runs it unchanged:
- ComfyUI: `weight_decompose` in comfy/weight_adapter/base.py (older checkouts: comfy/lora.py), called as its
  LoRA adapter (comfy/weight_adapter/lora.py) calls it: lora_diff = up.flatten(1) @ down.flatten(1) reshaped to
  the weight, alpha = the file's alpha / rank, the strength, fp32, `function` the identity;
- A1111: `NetworkModule.apply_weight_decompose` and `finalize_updown` (with `calc_scale`, `multiplier`) in
  extensions-builtin/Lora/network.py, fed as network_lora.py feeds them: updown = up @ down reshaped to the
  weight (lyco_helpers.rebuild_conventional), dim = rank; the patched weight is W + updown.
Their imports are not run: `comfy.model_management.cast_to_device` becomes `.to(device, dtype)`.
Without --lora, the files are made here: DoRAs on a tiny random SD 1.x model's UNet (attention and LoCon convs,
1x1 proj_in convs) and text encoder, with trained-size random factors and magnitudes, one per axis ("out":
[out, 1] magnitudes as peft and LyCORIS' default; "in": [1, in], the axis A1111 and ComfyUI normalise best),
with alpha = rank and alpha != rank, at strengths 1 and 0.7.
Prints, per case, the largest |W_theirs - W_ours| over all patched weights, beside the largest |W_ours - W|
(how much the DoRA changes them) and the largest |W|.
"""
import __future__
import argparse
import ast
import copy
import tempfile
import types
from pathlib import Path

import torch

from dreambooth_min.formats.checkpoint import load
from dreambooth_min.formats.lora_apply import apply_lora, parse_lora_arg
from dreambooth_min.formats.lora_file import load_lora, lora_state_dict, module_groups, save_lora
from dreambooth_min.formats.lora_names import module_table
from dreambooth_min.formats.make_tiny import make_tiny
from dreambooth_min.lora import CONV_TARGETS, TEXT_TARGETS, UNET_TARGETS, inject_lora


def _source(root, candidates):
    root = Path(root)
    if root.is_file():
        return root
    for c in candidates:
        if (root / c).is_file():
            return root / c
    raise SystemExit(f"none of {candidates} in {root}")


def _compiled(path, node):
    module = ast.Module(body=[node], type_ignores=[])
    return compile(module, str(path), "exec", flags=__future__.annotations.compiler_flag, dont_inherit=True)


def comfyui_decompose(root):
    """ComfyUI's weight_decompose, executed from its own source."""
    path = _source(root, ["comfy/weight_adapter/base.py", "comfy/lora.py"])
    node = next(n for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)
                and n.name == "weight_decompose")
    stub = types.SimpleNamespace(model_management=types.SimpleNamespace(
        cast_to_device=lambda t, device, dtype, *a, **k: t.to(device=device, dtype=dtype)))
    namespace = {"torch": torch, "comfy": stub}
    exec(_compiled(path, node), namespace)
    return path, namespace["weight_decompose"]


def a1111_module_class(root):
    """A1111's NetworkModule class (its methods), executed from its own source."""
    path = _source(root, ["extensions-builtin/Lora/network.py"])
    node = next(n for n in ast.parse(path.read_text()).body
                if isinstance(n, ast.ClassDef) and n.name == "NetworkModule")
    namespace = {"torch": torch}
    exec(_compiled(path, node), namespace)
    return path, namespace["NetworkModule"]


def comfyui_weight(decompose, w, g, strength):
    down, up, rank = g["down"].float(), g["up"].float(), g["down"].shape[0]
    alpha = float(g.get("alpha", rank)) / rank
    lora_diff = (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
    return decompose(g["dora"].float(), w.clone(), lora_diff, alpha, strength, torch.float32, lambda a: a)


def a1111_weight(module_class, w, g, strength, key):
    m = object.__new__(module_class)  # what NetworkModule.__init__ and network_lora.NetworkModuleLora set
    m.network = types.SimpleNamespace(te_multiplier=strength, unet_multiplier=strength)
    m.sd_key, m.shape, m.bias, m.scale = key, w.shape, None, None
    m.alpha = float(g["alpha"]) if "alpha" in g else None
    m.dora_scale, m.dora_norm_dims, m.dim = g["dora"].float(), w.dim() - 1, g["down"].shape[0]
    updown = (g["up"].float().flatten(1) @ g["down"].float().flatten(1)).reshape(w.shape)
    updown, _ = m.finalize_updown(updown, w, w.shape)
    return w + updown


def made_files(folder):
    """(tiny model folder, [(label, DoRA file)]): both axes, alpha = rank and alpha != rank."""
    model = Path(folder) / "model"
    make_tiny(model, "sd1")
    sd = load(model)
    files = []
    for axis in ("out", "in"):
        for alpha in (4, 2):
            unet, text = copy.deepcopy(sd.unet), copy.deepcopy(sd.text_encoder)
            torch.manual_seed(0)
            loras = inject_lora(unet, UNET_TARGETS + CONV_TARGETS + ("proj_in",), 4, alpha, dora=axis)
            text_loras = inject_lora(text, TEXT_TARGETS, 4, alpha, dora=axis)
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():  # about what training leaves: B ~ 1e-2, magnitudes a few % off the norms
                for m in [*loras.values(), *text_loras.values()]:
                    m.lora_up.weight.copy_(0.01 * torch.randn(m.lora_up.weight.shape, generator=g))
                    m.magnitude.mul_(1 + 0.03 * torch.randn(m.magnitude.shape, generator=g))
            path = Path(folder) / f"dora_{axis}_alpha{alpha}.safetensors"
            save_lora(path, lora_state_dict(loras, text_loras))
            files.append((f"axis {axis}, rank 4, alpha {alpha}", path))
    return model, files


def compare(model, path, strengths, decompose, module_class):
    """[(strength, max |ComfyUI - ours|, max |A1111 - ours|, max |ours - W|, max |W|)] over every patched weight."""
    sd = load(model)
    tensors, metadata = load_lora(path)
    rows = []
    for s in strengths:
        unet, text = copy.deepcopy(sd.unet), copy.deepcopy(sd.text_encoder)
        applied = apply_lora(unet, text, tensors, scale=s, metadata=metadata)
        tables = {"unet": module_table(sd.unet, "unet"), "te": module_table(sd.text_encoder, "te")}
        worst = [0.0, 0.0, 0.0, 0.0]
        for (part, key), g in module_groups(tensors).items():
            path_, base = tables[part][key]
            w = base.weight.detach().float()
            ours = applied[(part, path_)].weight.detach().float()
            theirs = (comfyui_weight(decompose, w, g, s), a1111_weight(module_class, w, g, s, key))
            for i, t in enumerate(theirs):
                worst[i] = max(worst[i], (t - ours).abs().max().item())
            worst[2], worst[3] = max(worst[2], (ours - w).abs().max().item()), max(worst[3], w.abs().max().item())
        rows.append((s, *worst))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--comfyui", required=True, help="a ComfyUI checkout, or its comfy/weight_adapter/base.py")
    p.add_argument("--a1111", required=True, help="a stable-diffusion-webui checkout, or its "
                                                  "extensions-builtin/Lora/network.py")
    p.add_argument("--model", help="the base model of --lora")
    p.add_argument("--lora", help="a DoRA file, FILE[:STRENGTH] (default: files made here, strengths 1 and 0.7)")
    args = p.parse_args(argv)
    comfy_path, decompose = comfyui_decompose(args.comfyui)
    a1111_path, module_class = a1111_module_class(args.a1111)
    print(f"ComfyUI: {comfy_path}:weight_decompose\nA1111:   {a1111_path}:NetworkModule.finalize_updown")
    with tempfile.TemporaryDirectory() as tmp:
        if args.lora:
            path, strength = parse_lora_arg(args.lora)
            model, cases, strengths = args.model, [(Path(path).name, path)], [strength]
        else:
            (model, cases), strengths = made_files(tmp), [1.0, 0.7]
        print("| DoRA | strength | max abs ComfyUI - ours | max abs A1111 - ours | max abs ours - W | max abs W |")
        print("| --- | --- | --- | --- | --- | --- |")
        for label, path in cases:
            for s, comfy, a1111, change, size in compare(model, path, strengths, decompose, module_class):
                print(f"| {label} | {s:g} | {comfy:.2e} | {a1111:.2e} | {change:.2e} | {size:.2e} |")


if __name__ == "__main__":
    main()
