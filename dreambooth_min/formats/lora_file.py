"""The LoRA file itself: what our files hold and say about themselves, and which files we take from others.

Kept apart from the names (lora_names.py) and from applying a file to a model (lora_apply.py) because
everything here is decided by the file alone: the same file is written by training, read back to resume,
and checked (a LoHa, a Flux LoRA is refused) before any model is looked at.

File format we write (kohya / A1111 / ComfyUI / diffusers all read it):
    lora_unet_<module path, '.' -> '_'>.lora_down.weight [r, in] (1x1 convs: [r, in, 1, 1];
        k x k convs, LoCon: [r, in, k, k])
    lora_unet_<...>.lora_up.weight [out, r] (convs: [out, r, 1, 1]),  lora_unet_<...>.alpha (0-d)
    lora_unet_<...>.dora_scale (DoRA, LyCORIS' key) [out, 1] / [out, 1, 1, 1], or [1, in] / [1, in, 1, 1]
        (magnitudes per input channel, as A1111 and ComfyUI read them best; docs/dora-and-ema.md)
    lora_te_text_model_<path inside CLIPTextModel>.*  for the text encoder.
SDXL files (kohya sd-scripts' SDXL networks, as ComfyUI and A1111 read them) name UNet layers by their LDM paths
(lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q) and the two text encoders lora_te1_ (CLIP-L) and
lora_te2_ (OpenCLIP bigG in transformers' names); the metadata names the family (ss_base_model_version).
What we read besides (other people's LoRAs): kohya files with LDM names (lora_unet_input_blocks_1_1_...),
without alpha, with fp16/bf16 factors, LoCon with a CP-decomposed lora_mid; diffusers / peft files
(unet.<path>.lora_A.weight / lora_B.weight, text_encoder.<path>..., SDXL's text_encoder_2.<path>..., the older
<attn>.processor.to_q_lora.down.weight form), their alpha from `.alpha` keys or from the
`lora_adapter_metadata` JSON that diffusers writes (peft LoraConfig fields per component: r,
lora_alpha, rank_pattern, alpha_pattern, use_rslora).
"""
import json
import re
from pathlib import Path

import torch

from ..errors import UserError
from .lora_names import kohya_modules, parse_key
from .safetensors_io import SafetensorsFile, save_atomic


def wrapper_fields(m):
    """[(kohya field, tensor)] of one wrapper's trained tensors: lora_down / lora_up weights and, for DoRA,
    LyCORIS' `dora_scale` (the magnitude, [out, 1(, 1, 1)] or [1, in(, 1, 1)] by its axis)."""
    return [("lora_down.weight", m.lora_down.weight), ("lora_up.weight", m.lora_up.weight)] + \
        ([("dora_scale", m.magnitude)] if hasattr(m, "magnitude") else [])


def lora_state_dict(unet_loras, text_loras=None, dtype=torch.float32, text_loras_2=None, unet_paths=None):
    """Named tensors in kohya's format for the wrappers returned by inject_lora (SDXL: see kohya_modules)."""
    out = {}
    for k, m in kohya_modules(unet_loras, text_loras, text_loras_2, unet_paths):
        for field, t in wrapper_fields(m):
            out[f"{k}.{field}"] = t.detach().to("cpu", dtype)
        out[k + ".alpha"] = torch.tensor(m.alpha, dtype=torch.float32)
    return out


def family_metadata(version, prediction_type):
    """The model family in the keys others read: kohya's ss_base_model_version (sd_v1, sd_v2_v, sdxl_base_v1-0)
    and the Stability AI model spec's architecture (stable-diffusion-xl-v1-base/lora), as sd-scripts writes them."""
    v = prediction_type == "v_prediction"
    if version == "sdxl":
        return {"ss_base_model_version": "sdxl_base_v1-0", "modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}
    arch = "stable-diffusion-v1" if version == "sd1" else f"stable-diffusion-v2-{'768-v' if v else '512'}"
    return {"ss_base_model_version": f"sd_{'v2' if version == 'sd2' else 'v1'}{'_v' * v}",
            "modelspec.architecture": arch + "/lora"}


def training_metadata(sd, instance_prompt, class_prompt, resolution, rank, alpha, step):
    """What our LoRA files say about their training, in kohya's ss_* keys (which A1111 shows): the base model
    (and, for a Hub model, its repo and commit) and its family, prompts, resolution, rank, alpha, steps."""
    return family_metadata(sd.version, sd.prediction_type) | {
            "ss_base_model": sd.name, "ss_sd_version": sd.version, "ss_prediction_type": sd.prediction_type,
            "ss_instance_prompt": instance_prompt, "ss_class_prompt": class_prompt,
            "ss_resolution": str(resolution), "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
            "ss_training_tool": "dreambooth_min", "ss_steps": str(step)} | \
        {f"ss_base_model_{k}": str(v) for k, v in sd.source.items() if k != "path"}


def kernel_size(t):
    """A tensor's kernel size, () for a Linear-like [out, in] or [out, in, 1, 1] weight."""
    k = tuple(t.shape[2:])
    return () if all(n == 1 for n in k) else k


def save_lora(path, tensors, metadata=None):
    """Write `tensors` (lora_state_dict) atomically, with string metadata plus kohya's ss_network_* keys
    (dim / alpha of the linear layers; a LoCon file's conv dim / alpha in ss_network_args, as sd-scripts)."""
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    downs = [(k[: -len(".lora_down.weight")], v) for k, v in tensors.items() if k.endswith(".lora_down.weight")]
    linear = next(((k, v) for k, v in downs if kernel_size(v) == ()), None)
    conv = next(((k, v) for k, v in downs if kernel_size(v) != ()), None)
    if linear or conv:
        k, down = linear or conv
        meta.setdefault("ss_network_dim", str(down.shape[0]))
        if k + ".alpha" in tensors:
            meta.setdefault("ss_network_alpha", f"{tensors[k + '.alpha'].item():g}")
    if conv:
        k, down = conv
        alpha = tensors.get(k + ".alpha")
        args = {"conv_dim": str(down.shape[0]), "conv_alpha": f"{down.shape[0] if alpha is None else alpha.item():g}"}
        meta.setdefault("ss_network_args", json.dumps(args))
    meta.setdefault("ss_network_module", "networks.lora")
    save_atomic(tensors, path, metadata=meta)


def load_lora(path):
    """(tensors, metadata) of a LoRA .safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"LoRA file {path} does not exist")
    f = SafetensorsFile(path)
    try:  # by the names alone, before a model given here is read whole
        _refuse_other_kinds(f.entries)
    except UserError as e:  # several --lora files: say which one
        raise UserError(f"{path}: {e}") from None
    return {k: f.read(k) for k in f.entries}, f.metadata  # every value checked finite (NonFinite names the tensor)


# ---------------------------------------------------------------------------------------------------
# Reading other people's files: every key -> (part, module name, field), grouped by module

# (key pattern, kind): LyCORIS networks whose weight update is not (alpha / r) B A (DoRA's dora_scale /
# lora_magnitude_vector is read; LyCORIS' wd_on_diff DoRA, which decomposes dW alone, is not)
OTHER_KINDS = ((r"\.wd_for_diff$", "DoRA of the difference (LyCORIS wd_on_diff)"), (r"\.hada_", "LoHa (hada_)"),
               (r"\.lokr_", "LoKr (lokr_)"), (r"\.oft_", "OFT"), (r"\.on_input$", "IA3"), (r"\.[wb]_norm$", "norm"),
               (r"\.diff(_b)?$", "full-difference"), (r"\.a1\.weight$", "GLoRA"),
               (r"\.lora_B(\.[\w-]+)?\.bias$", "LoRA-bias"))
OTHER_FAMILIES = (("transformer.", "a DiT (SD3 / Flux)"),
                  ("lora_transformer_", "a DiT (SD3 / Flux)"), ("lora_unet_double_blocks_", "Flux"),
                  ("lora_unet_single_blocks_", "Flux"), ("lora_prior_", "Stable Cascade"))


def _refuse_other_kinds(tensors):
    """One line for a file that is not a plain LoRA / LoCon for SD 1.x / 2.x / SDXL."""
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "unet.conv_in.weight")) for k in tensors):
        raise UserError("this file is a Stable Diffusion model, not a LoRA: pass it with --model")
    for marker, kind in OTHER_KINDS:
        found = [k for k in tensors if re.search(marker, k)]
        if found:
            raise UserError(f"this file is a {kind} network, an unsupported kind ({len(found)} keys like "
                            f"{found[0]}): only LoRA / LoCon files (lora_down/lora_up or lora_A/lora_B keys) are read")
    for prefix, family in OTHER_FAMILIES:
        found = [k for k in tensors if k.startswith(prefix)]
        if found:
            raise UserError(f"this LoRA was made for {family}, not for SD 1.x / 2.x / SDXL (keys like {found[0]})")


def module_groups(tensors):
    """{(part, module name): {'down', 'up', 'alpha', 'mid', 'dora', 'style'}} for kohya and diffusers/peft key styles.

    kohya: part 'unet'/'te' (SDXL: 'te1'/'te2'), name = the kohya name (resolved later against the model's paths).
    peft ('unet.<path>.lora_A.weight', 'text_encoder.<path>.lora_B.weight', SDXL's 'text_encoder_2.<path>...':
    part 'te2'): name = the dotted path.
    """
    _refuse_other_kinds(tensors)
    groups, bad = {}, []
    for k, v in tensors.items():
        parsed = parse_key(k)
        if parsed is None:
            bad.append(k)
            continue
        part, name, field, style = parsed
        groups.setdefault((part, name), {"style": style})[field] = v
    if bad:
        raise UserError(f"LoRA file has {len(bad)} keys of an unsupported kind, e.g. {bad[:3]}")
    return groups

