"""LoRAs baked into a model, and the full weight updates that lora_svd.py factorizes: those of several LoRAs
summed (merge --into-lora), or a fine-tuned model's difference from its base (extract).

Kept apart from applying one LoRA (lora_apply.py, which this builds on: every kind it reads, LoCon and DoRA
included, merges here too) because these tools look at the model's layers as a whole: which ones a set of files
changes, and by how much. A layer's update is whatever apply_lora(merge=True) changed in its weight, so an update
is measured, never re-derived from the file's factors.
"""
import torch
import torch.nn as nn
from tqdm import tqdm

from ..errors import UserError
from .lora_apply import apply_lora
from .lora_file import load_lora, module_groups
from .lora_names import kohya_name, kohya_unet_paths, module_table


def model_parts(sd):
    """{kohya part: module} of a loaded model: 'unet' and 'te', or for SDXL 'unet', 'te1' (CLIP-L), 'te2' (bigG)."""
    if sd.text_encoder_2 is None:
        return {"unet": sd.unet, "te": sd.text_encoder}
    return {"unet": sd.unet, "te1": sd.text_encoder, "te2": sd.text_encoder_2}


def _targets(sd, tensors):
    """{(part, path): layer} that a LoRA file's modules name in `sd` (as apply_lora resolves them)."""
    parts, sdxl = model_parts(sd), sd.text_encoder_2 is not None
    tables, found = {}, {}
    for part, name in module_groups(tensors):
        part = "te1" if sdxl and part == "te" else part
        if part in parts and part not in tables:
            tables[part] = module_table(parts[part], part)
        entry = tables.get(part, {}).get(name)
        if entry is not None:
            found[(part, entry[0])] = entry[1]
    return found


def merge_loras(sd, loras, keep_updates=False, progress=True):
    """Bake `loras` [(path, strength)] into `sd` one after another (apply_lora, merge=True: W += s (alpha / r) B A,
    or the file's own rule for other kinds). With `keep_updates`, return {(part, path): dW} of every layer they
    changed, dW = W after - W before in fp32 on the CPU (only those layers' old weights are held meanwhile)."""
    before = {}
    for path, strength in tqdm(loras, desc="merge", disable=not progress or len(loras) < 2):
        tensors, metadata = load_lora(path)
        if keep_updates:
            for key, layer in _targets(sd, tensors).items():
                before.setdefault(key, layer.weight.detach().to("cpu", torch.float32, copy=True))
        applied = apply_lora(sd.unet, sd.text_encoder, tensors, scale=strength, metadata=metadata,
                             text_encoder_2=sd.text_encoder_2)
        if keep_updates and not applied.keys() <= before.keys():
            raise RuntimeError(f"layers merged but not saved first: {sorted(applied.keys() - before.keys())[:3]}")
    layers = dict(model_layers(sd)) if before else {}
    return {key: layers[key].weight.detach().to("cpu", torch.float32) - w for key, w in before.items()}


def model_layers(sd):
    """((part, path), layer) for every Linear and Conv2d of the UNet and text encoder(s): what a LoRA can change."""
    for part, model in model_parts(sd).items():
        for path, m in model.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                yield (part, path), m


def kohya_keys(sd, updates):
    """{kohya name: dW} for updates keyed by (part, path); SDXL UNet layers under their LDM paths (kohya's names)."""
    ldm = kohya_unet_paths(sd.unet)
    return {kohya_name(ldm.get(path, path) if part == "unet" else path, part): dw
            for (part, path), dw in updates.items()}


def _check_same_kind(base, tuned):
    if base.version != tuned.version:
        raise UserError(f"--model is {base.version} and --tuned is {tuned.version}: extract needs a model and its own "
                        "fine-tune")


def model_differences(base, tuned, min_diff=0.0, progress=True):
    """({(part, path): W_tuned - W_base} of every Linear / Conv2d whose weights differ by more than `min_diff`
    somewhere, in fp32 on the CPU; the names of other tensors that differ: biases, norms, embeddings, the VAE, which
    a LoRA cannot hold)."""
    _check_same_kind(base, tuned)
    tuned_layers = dict(model_layers(tuned))
    updates = {}
    for key, layer in tqdm(list(model_layers(base)), desc="compare", disable=not progress):
        other = tuned_layers.get(key)
        if other is None or other.weight.shape != layer.weight.shape:
            raise UserError(f"--tuned has no layer {key[0]}:{key[1]} of shape {tuple(layer.weight.shape)}: "
                            "not a fine-tune of --model")
        dw = other.weight.detach().to("cpu", torch.float32) - layer.weight.detach().to("cpu", torch.float32)
        if dw.abs().max() > min_diff:
            updates[key] = dw
    held = {f"{part}.{path}.weight" for part, path in tuned_layers}
    others = []
    for part, model in list(model_parts(base).items()) + [("vae", base.vae)]:
        theirs = dict(getattr(tuned, {"unet": "unet", "vae": "vae", "te2": "text_encoder_2"}.get(part, "text_encoder"))
                      .state_dict())
        others += [f"{part}.{k}" for k, v in model.state_dict().items()
                   if f"{part}.{k}" not in held and k in theirs and not torch.equal(v, theirs[k])]
    return updates, others
