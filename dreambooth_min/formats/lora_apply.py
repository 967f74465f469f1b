"""Applying a LoRA file to a model: merged into its weights or as wrappers of a given strength, and the
--lora FILE[:SCALE] argument that asks for it.

Kept apart from the file (lora_file.py) because everything here needs the model as well: which family it is
(a LoRA for another one is refused in one line naming both), which layers it has (lora_names.module_table),
and their shapes, dtypes and devices. The file's own checks have run by then (lora_file.module_groups).
"""
import json
import math
import re
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import UserError
from ..lora import LoRALinear, dora_axis, dora_weight, lora_delta, make_wrapper
from .lora_file import kernel_size, module_groups
from .lora_names import TEXT_PARTS, module_table, text_path


# ---------------------------------------------------------------------------------------------------
# Which family a LoRA and a model belong to

WIDTH_FAMILIES = {"text": {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"},
                  "hidden states": {768: "SD 1.x", 1024: "SD 2.x", 1280: "SDXL"}}
# What a file's metadata says its base model is: ours (ss_sd_version), kohya's (ss_base_model_version, ss_v2)
# and the ModelSpec architecture that kohya and others write.
METADATA_FAMILIES = (("ss_sd_version", {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}),
                     ("ss_base_model_version", {"sd_v1": "SD 1.x", "sd_v2": "SD 2.x", "sd_v2_768_v": "SD 2.x",
                                                "sdxl_base_v1-0": "SDXL", "sdxl_base_v0-9": "SDXL"}),
                     ("modelspec.architecture", {"stable-diffusion-v1": "SD 1.x", "stable-diffusion-v2": "SD 2.x",
                                                 "stable-diffusion-xl": "SDXL"}),
                     ("ss_v2", {"False": "SD 1.x", "True": "SD 2.x"}))


def file_family(metadata, width=None):
    """"SD 1.x" / "SD 2.x" / "SDXL" as the LoRA file's metadata says, else from its cross-attention text width."""
    for key, families in METADATA_FAMILIES:
        value = (metadata or {}).get(key, "")
        found = next((f for prefix, f in families.items() if value == prefix or value.startswith(prefix + "-")
                      or value.startswith(prefix + "/")), None)
        if found:
            return found
    return WIDTH_FAMILIES["text"].get(width)


def model_family(unet):
    """The UNet's family: SDXL reads 2048-wide text; SD 2.x has linear transformer projections, SD 1.x 1x1 convs."""
    cfg = getattr(unet, "config", None)
    get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
    if get("cross_attention_dim") == 2048:
        return "SDXL"
    return None if cfg is None else "SD 2.x" if get("use_linear_projection") else "SD 1.x"


def _width(w, what):
    family = WIDTH_FAMILIES[what].get(w)
    return f"{w}-wide {what}" + (f" ({family})" if family else "")


def _model_family(unet, text_encoder_2):
    """'SDXL' (two text encoders), else 'SD 1.x' / 'SD 2.x' by the width of the text the UNet reads."""
    if text_encoder_2 is not None:
        return "SDXL"
    width = getattr(getattr(unet, "config", None), "cross_attention_dim", None)
    return WIDTH_FAMILIES["text"].get(width if isinstance(width, int) else None, "SD 1.x / 2.x")


def _file_family(groups):
    """(family, a key that shows it) of a LoRA by its text-encoder parts: 'SDXL' (te1 / te2: two text
    encoders), 'SD 1.x / 2.x' (kohya's one lora_te_), or (None, None) when its keys do not tell."""
    for (part, name), g in groups.items():
        if part in ("te1", "te2"):
            return "SDXL", name
    for (part, name), g in groups.items():
        if part == "te" and g["style"] == "kohya":
            return "SD 1.x / 2.x", name
    return None, None


def _refuse_other_family(groups, model_family):
    """An SDXL LoRA on SD 1.x / 2.x, or the reverse: one line naming both families."""
    family, key = _file_family(groups)
    if family is not None and (family == "SDXL") != (model_family == "SDXL"):
        raise UserError(f"this LoRA was made for {family}, not for this {model_family} model (keys like {key})")


def _check_family(groups, tables, metadata=None, unet=None):
    """A LoRA for another model family reads text of another width: name both families in one line (before the
    less telling 'matches nothing' / 'does not fit')."""
    text = (r"self_attn[._]q_proj$", r"self_attn\.q_proj$", "text-encoder layers", "hidden states")
    checks = (("unet", r"attn2[._]to_k$", r"attn2\.to_k$", "cross-attention layers", "text"),
              *((part,) + text for part in TEXT_PARTS))
    for part, file_pattern, model_pattern, layers, what in checks:
        theirs = next((g["down"].shape[1] for (p, name), g in groups.items()
                       if p == part and "down" in g and re.search(file_pattern, name)), None)
        ours = next((m.weight.shape[1] for key, (path, m) in tables.get(part, {}).items()
                     if key == path and re.search(model_pattern, path)), None)
        if theirs is not None and ours is not None and theirs != ours:
            file, model = file_family(metadata, theirs if what == "text" else None), model_family(unet)
            which = f", {file}, and this model is {model} (use an {model} LoRA, or the {file} model)" \
                if file and model and file != model else ""
            raise UserError(f"this LoRA was made for another model family{which}: its {layers} expect "
                            f"{_width(theirs, what)} and do not fit this model's {_width(ours, what)}")


# ---------------------------------------------------------------------------------------------------
# Applying

def _dora(key, g, path, w):
    """DoRA's magnitude of group `g` shaped [out, 1, ...] or [1, in, ...] (its axis, lora.channel_norm), or None.
    LyCORIS stores [out, 1(, 1, 1)] or [1, in(, 1, 1)]; peft always the output axis, [out] (convs: [1, out, 1, 1])."""
    m = g.get("dora")
    if m is None:
        return None
    out, ones = w.shape[0], [1] * (w.dim() - 1)
    if m.numel() == out and (g["style"] == "peft" or m.shape[0] == out):
        return m.reshape(out, *ones)
    if m.dim() >= 2 and m.shape[0] == 1 and m.numel() == w.shape[1]:
        return m.reshape(1, w.shape[1], *ones[1:])
    raise UserError(f"LoRA module {key} has a DoRA scale of shape {tuple(m.shape)}, which fits neither axis of "
                    f"{path} {tuple(w.shape)} (another base model?)")


def _checked(key, g, path, w):
    """(down, up, mid) of group `g` if its shapes fit the weight `w` of `path`, else a UserError."""
    down, up, mid = g["down"], g["up"], g.get("mid")
    rank = down.shape[0]
    ok = down.dim() in (2, 4) and up.dim() == down.dim() and tuple(up.shape[:2]) == (w.shape[0], rank) \
        and down.shape[1] == w.shape[1] and kernel_size(up) == ()
    if mid is None:
        ok = ok and kernel_size(down) == kernel_size(w)
    else:  # LyCORIS LoCon with CP decomposition: 1x1 down, k x k mid [r, r, k, k], 1x1 up
        ok = ok and kernel_size(down) == () and tuple(mid.shape[:2]) == (rank, rank) and kernel_size(mid) == kernel_size(w)
    if not ok:
        shapes = " / ".join(str(tuple(t.shape)) for t in (down, mid, up) if t is not None)
        raise UserError(f"LoRA module {key} has shapes {shapes}, which do not fit {path} {tuple(w.shape)} "
                        f"(another base model?)")
    return down, up, mid


def _peft_config(metadata, part):
    """The peft LoraConfig fields that diffusers stores for `part` in the `lora_adapter_metadata` JSON
    ({"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {...}, "text_encoder.r": ...}), or {}."""
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except ValueError:
        raise UserError("the LoRA file's lora_adapter_metadata is not valid JSON") from None
    prefix = {"unet": "unet.", "te": "text_encoder.", "te1": "text_encoder.", "te2": "text_encoder_2."}[part]
    return {k[len(prefix):]: v for k, v in config.items() if k.startswith(prefix)}


def _pattern(patterns, path, default):
    """peft's rank_pattern / alpha_pattern lookup: the first key that is a dotted suffix (regex) of `path`."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _alpha(g, config, path, rank):
    """alpha such that the update is (alpha / rank) B A: the file's `.alpha`, else the diffusers metadata
    (lora_alpha / alpha_pattern; rsLoRA's alpha / sqrt(r) folded in), else rank (kohya and peft: scale 1)."""
    if "alpha" in g:
        return float(g["alpha"])
    if g["style"] == "peft" and "lora_alpha" in config:
        alpha = float(_pattern(config.get("alpha_pattern"), path, config["lora_alpha"]))
        return alpha * math.sqrt(rank) if config.get("use_rslora") else alpha
    return float(rank)


@torch.no_grad()
def _merge(w, down, up, mid, scale, dora=None, strength=1.0):
    """W += scale * B A (LoCon with mid: the CP composition of up, mid, down), in fp32, rounded once.
    DoRA (`dora` = its magnitude): W += strength * (m (W + scale B A) / ||W + scale B A|| - W)."""
    down, up = down.to(w.device, torch.float32), up.to(w.device, torch.float32)
    if mid is None:
        delta = lora_delta(up, down, scale, w.shape)
    else:
        mid = mid.to(w.device, torch.float32)
        delta = scale * torch.einsum("r s k l, o r, s i -> o i k l", mid, up.flatten(1), down.flatten(1))
    merged = w.float() + delta if dora is None else dora_weight(w, delta, dora.to(w.device), strength)
    w.copy_(merged.to(w.dtype))


def _text_tables(text_encoder, text_encoder_2, groups):
    """{part: text encoder} of the model, and `groups` with diffusers' SDXL `text_encoder.` (CLIP-L) as te1."""
    if text_encoder_2 is None:
        return {"te": text_encoder}, groups
    renamed = {("te1" if part == "te" else part, name): g for (part, name), g in groups.items()}
    return {"te1": text_encoder, "te2": text_encoder_2}, renamed


@torch.no_grad()
def apply_lora(unet, text_encoder, tensors, scale=1.0, merge=True, metadata=None, text_encoder_2=None):
    """Apply a LoRA file's tensors: W += scale * (alpha / r) * B A  (merge=True; LoCon convs: B A is the
    1x1-after-k x k composition; DoRA: lora.dora_weight at strength `scale`), or wrap each layer with a LoRA
    module of multiplier `scale` (merge=False, strength changeable later). `metadata` (load_lora's second
    value) supplies the alpha of diffusers / peft files that keep it there. SDXL: `text_encoder_2` is OpenCLIP
    bigG (kohya's te2).

    Module names are found by converting each of the model's own module paths to kohya form (paths
    contain '_' themselves, e.g. 'to_q', 'transformer_blocks', so a key cannot be split back).
    Returns {(part, path): module}. Raises UserError naming keys that match no module.
    """
    groups = module_groups(tensors)
    _refuse_other_family(groups, _model_family(unet, text_encoder_2))
    texts, groups = _text_tables(text_encoder, text_encoder_2, groups)
    models = {"unet": unet} | texts
    tables = {part: module_table(model, part) for part, model in models.items() if model is not None}
    _check_family(groups, tables, metadata, unet)
    missing = [f"{part}:{key}" for part, key in groups if key not in tables.get(part, {})]
    incomplete = [key for (part, key), g in groups.items() if not {"down", "up"} <= g.keys()]
    if missing:
        raise UserError(f"{len(missing)} of {len(groups)} LoRA modules match nothing in the model "
                        f"(wrong base model?): {missing[:3]}")
    if incomplete:
        raise UserError(f"LoRA modules lack lora_down or lora_up weights: {incomplete[:3]}")
    configs = {part: _peft_config(metadata, part) for part in tables}
    applied = {}
    for (part, key), g in groups.items():
        path, module = tables[part][key]
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            raise UserError(f"LoRA module {key} targets {path}, a {type(module).__name__}")
        down, up, mid = _checked(key, g, path, module.weight)
        dora = _dora(key, g, path, module.weight)
        rank = down.shape[0]
        alpha = _alpha(g, configs[part], text_path(path) if part in TEXT_PARTS else path, rank)
        if merge:
            lora_scale = scale * alpha / rank if dora is None else alpha / rank  # DoRA: the strength acts outside
            _merge(module.weight, down, up, mid, lora_scale, dora, scale)
            applied[(part, path)] = module
            continue
        model = models[part]
        if isinstance(model.get_submodule(path), LoRALinear):
            raise UserError(f"{path} already has a LoRA: pass merge=True to stack another one")
        if mid is not None:
            raise UserError(f"LoRA module {key} has a lora_mid (CP-decomposed LoCon): pass merge=True")
        axis = None if dora is None else dora_axis(dora, module.weight.shape)
        lora = make_wrapper(module, rank, alpha, multiplier=scale, dora=axis)
        for t, saved in zip(lora.trainable(), (down, up, dora)):  # DoRA: the magnitude is third
            t.copy_(saved.reshape(t.shape))
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, lora)
        applied[(part, path)] = lora
    return applied


# ---------------------------------------------------------------------------------------------------
# Command-line use: --lora FILE[:SCALE], repeatable

def parse_lora_arg(text, default_scale=1.0):
    """'style.safetensors:0.8' -> (Path, 0.8); without ':SCALE' the scale is `default_scale`. The scale is
    what follows the last ':' when that is a number, so Windows paths ('C:\\x.safetensors') still parse.
    Raises UserError for a file that does not exist (checked before any slow work)."""
    path, sep, tail = text.rpartition(":")
    try:
        scale = float(tail) if sep and path else None
    except ValueError:
        scale = None
        if path.lower().endswith(".safetensors") and not Path(text).is_file():
            raise UserError(f"--lora {text}: bad strength {tail!r}: give a number, e.g. {path}:0.8") from None
    if scale is None:
        path, scale = text, float(default_scale)
    if not math.isfinite(scale):
        raise UserError(f"--lora {text}: the strength must be a finite number")
    if not Path(path).is_file():
        raise UserError(f"LoRA file {path} does not exist")
    return Path(path), scale


def lora_label(loras):
    """The "LoRA" value of an image's A1111-style parameters: 'name:scale' per file, quoted when there are
    several (A1111's parameters are comma-separated); a trainer's runs/<run>/lora -> '<run>/lora'."""
    labels = []
    for path, scale in loras:
        p = Path(path).resolve()
        name = f"{p.parent.name}/{p.stem}" if p.stem == "lora" else p.stem
        labels.append(f"{name}:{scale}")
    return None if not labels else labels[0] if len(labels) == 1 else '"' + ", ".join(labels) + '"'
