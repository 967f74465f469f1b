"""The LoRA file: kohya names, save, load, and applying someone's LoRA to a model.

File format (kohya / A1111 / ComfyUI / diffusers all read it):
    lora_unet_<module path, '.' -> '_'>.lora_down.weight [r, in] (convs: [r, in, 1, 1])
    lora_unet_<...>.lora_up.weight [out, r] (convs: [out, r, 1, 1]),  lora_unet_<...>.alpha (0-d)
    lora_te_text_model_<path inside CLIPTextModel>.*  for the text encoder.
"""
from pathlib import Path

import torch
import torch.nn as nn

from .errors import UserError
from .lora import LoRALinear, lora_delta
from .safetensors_io import SafetensorsFile, save_atomic


def _text_path(path):
    # transformers 5's CLIPTextModel has no `.text_model` level; kohya names always include it.
    return path if path.startswith("text_model.") else "text_model." + path


def kohya_name(path, part):
    """'down_blocks.0.attentions.0...to_q', 'unet' -> 'lora_unet_down_blocks_0_attentions_0_..._to_q'."""
    if part == "te":
        path = _text_path(path)
    return f"lora_{part}_" + path.replace(".", "_")


def lora_state_dict(unet_loras, text_loras=None, dtype=torch.float32):
    """Named tensors in kohya's format for the wrappers returned by inject_lora."""
    out = {}
    for part, loras in (("unet", unet_loras), ("te", text_loras or {})):
        for path, m in loras.items():
            k = kohya_name(path, part)
            out[k + ".lora_down.weight"] = m.lora_down.weight.detach().to("cpu", dtype)
            out[k + ".lora_up.weight"] = m.lora_up.weight.detach().to("cpu", dtype)
            out[k + ".alpha"] = torch.tensor(m.alpha, dtype=torch.float32)
    return out


def save_lora(path, tensors, metadata=None):
    """Write `tensors` (lora_state_dict) atomically, with string metadata plus kohya's ss_network_* keys."""
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    down = next((v for k, v in tensors.items() if k.endswith(".lora_down.weight")), None)
    alpha = next((v for k, v in tensors.items() if k.endswith(".alpha")), None)
    if down is not None:
        meta.setdefault("ss_network_dim", str(down.shape[0]))
    if alpha is not None:
        meta.setdefault("ss_network_alpha", f"{alpha.item():g}")
    meta.setdefault("ss_network_module", "networks.lora")
    save_atomic(tensors, path, metadata=meta)


def load_lora(path):
    """(tensors, metadata) of a LoRA .safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"LoRA file {path} does not exist")
    f = SafetensorsFile(path)
    return {k: f.read(k) for k in f.entries}, f.metadata


# peft (diffusers >= 0.24 `save_lora_weights`) and diffusers' converted-kohya style
PEFT_SUFFIXES = ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora.down.weight", "down"),
                 (".lora.up.weight", "up"), (".alpha", "alpha"))


def _group(tensors):
    """{(part, module key): {'down', 'up', 'alpha'}} for kohya and diffusers/peft key styles.

    kohya: part 'unet'/'te', key = the kohya name (resolved later against the model's own paths).
    peft ('unet.<path>.lora_A.weight', 'text_encoder.<path>.lora_B.weight'): key = the dotted path;
    there a missing alpha means alpha = r (peft files keep lora_alpha outside the tensors).
    """
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "unet.conv_in.")) for k in tensors):
        raise UserError("this file is a Stable Diffusion model, not a LoRA: pass it with --model")
    groups, bad = {}, []
    for k, v in tensors.items():
        if k.startswith(("lora_unet_", "lora_te_")):
            name, _, field = k.partition(".")
            part = "unet" if name.startswith("lora_unet_") else "te"
            field = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(field)
        elif k.startswith(("unet.", "text_encoder.")):
            prefix, _, rest = k.partition(".")
            part = "unet" if prefix == "unet" else "te"
            for suffix, field in PEFT_SUFFIXES:
                if rest.endswith(suffix):
                    name = rest[: -len(suffix)]
                    name = _text_path(name) if part == "te" else name
                    break
            else:
                field = None
        else:
            field = None
        if field is None:
            bad.append(k)
            continue
        groups.setdefault((part, name), {})[field] = v
    if bad:
        raise UserError(f"LoRA file has {len(bad)} keys of an unsupported kind (LyCORIS/LoHa/DoRA?), "
                        f"e.g. {bad[:3]}")
    return groups


def _module_table(model, part):
    """{kohya name: (path, module)} and {dotted path: same} for every module of `model`.

    A layer already wrapped by a LoRALinear is found under the wrapper's path and means its base.
    """
    wrappers = {p for p, m in model.named_modules() if isinstance(m, LoRALinear)}
    table, clashes = {}, set()
    for path, m in model.named_modules():
        if not path or path.rpartition(".")[0] in wrappers:
            continue
        entry = (path, m.base if isinstance(m, LoRALinear) else m)
        key = kohya_name(path, part)
        if key in table:
            clashes.add(key)  # two paths that differ only in '.' vs '_': refuse to guess
        table[key] = entry
        table[_text_path(path) if part == "te" else path] = entry
    for key in clashes:
        table.pop(key)
    return table


@torch.no_grad()
def apply_lora(unet, text_encoder, tensors, scale=1.0, merge=True):
    """Apply a LoRA file's tensors: W += scale * (alpha / r) * B A  (merge=True), or wrap each
    layer with a LoRALinear of multiplier `scale` (merge=False, strength changeable later).

    Module names are found by converting each of the model's own module paths to kohya form (paths
    contain '_' themselves, e.g. 'to_q', 'transformer_blocks', so a key cannot be split back).
    Returns {(part, path): module}. Raises UserError naming keys that match no module.
    """
    tables = {"unet": _module_table(unet, "unet")}
    if text_encoder is not None:
        tables["te"] = _module_table(text_encoder, "te")
    models = {"unet": unet, "te": text_encoder}
    groups = _group(tensors)
    missing = [f"{part}:{key}" for part, key in groups if key not in tables.get(part, {})]
    incomplete = [key for (part, key), g in groups.items() if not {"down", "up"} <= g.keys()]
    if missing:
        raise UserError(f"{len(missing)} of {len(groups)} LoRA modules match nothing in the model "
                        f"(wrong base model?): {missing[:3]}")
    if incomplete:
        raise UserError(f"LoRA modules lack lora_down or lora_up weights: {incomplete[:3]}")
    applied = {}
    for (part, key), g in groups.items():
        path, module = tables[part][key]
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            raise UserError(f"LoRA module {key} targets {path}, a {type(module).__name__}")
        down, up, w = g["down"].flatten(1), g["up"].flatten(1), module.weight
        rank = down.shape[0]
        if down.shape != (rank, w.shape[1]) or up.shape != (w.shape[0], rank):
            raise UserError(f"LoRA module {key} has shapes {tuple(g['down'].shape)} / {tuple(g['up'].shape)}, "
                            f"which do not fit {path} {tuple(w.shape)} (another base model?)")
        alpha = float(g["alpha"]) if "alpha" in g else None
        if merge:
            # W += scale * (alpha / r) * B A, computed in fp32 and rounded once to W's dtype.
            a = rank if alpha is None else alpha
            delta = lora_delta(up.to(w.device), down.to(w.device), scale * a / rank, w.shape)
            w.copy_((w.float() + delta).to(w.dtype))
            applied[(part, path)] = module
            continue
        model = models[part]
        if isinstance(model.get_submodule(path), LoRALinear):
            raise UserError(f"{path} already has a LoRA: pass merge=True to stack another one")
        lora = LoRALinear(module, rank, alpha, multiplier=scale)
        lora.lora_down.weight.copy_(down.view_as(lora.lora_down.weight))
        lora.lora_up.weight.copy_(up.view_as(lora.lora_up.weight))
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, lora)
        applied[(part, path)] = lora
    return applied
