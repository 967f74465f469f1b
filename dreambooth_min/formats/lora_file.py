"""The LoRA file: kohya names, save, load, and applying someone's LoRA to a model.

File format we write (kohya / A1111 / ComfyUI / diffusers all read it):
    lora_unet_<module path, '.' -> '_'>.lora_down.weight [r, in] (1x1 convs: [r, in, 1, 1];
        k x k convs, LoCon: [r, in, k, k])
    lora_unet_<...>.lora_up.weight [out, r] (convs: [out, r, 1, 1]),  lora_unet_<...>.alpha (0-d)
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
import math
import re
from pathlib import Path

import torch
import torch.nn as nn

from .checkpoint_names import unet_rename_table, unrename
from ..errors import UserError
from ..lora import LoRALinear, lora_class, lora_delta
from .safetensors_io import SafetensorsFile, save_atomic
from ..unet import UNetConfig


TEXT_PARTS = ("te", "te1", "te2")  # kohya: SD 1.x / 2.x's one text encoder; SDXL's CLIP-L and OpenCLIP bigG


def _text_path(path):
    # transformers 5's CLIPTextModel has no `.text_model` level; kohya names always include it.
    return path if path.startswith("text_model.") else "text_model." + path


def kohya_name(path, part):
    """'down_blocks.0.attentions.0...to_q', 'unet' -> 'lora_unet_down_blocks_0_attentions_0_..._to_q'."""
    if part in TEXT_PARTS:
        path = _text_path(path)
    return f"lora_{part}_" + path.replace(".", "_")


def lora_parts(unet_loras, text_loras=None, text_loras_2=None):
    """{kohya part: {path: wrapper}}: 'unet' and 'te', or for SDXL (text_loras_2 not None) 'te1' and 'te2'."""
    if text_loras_2 is None:
        return {"unet": unet_loras, "te": text_loras or {}}
    return {"unet": unet_loras, "te1": text_loras or {}, "te2": text_loras_2}


def kohya_unet_paths(unet):
    """{our path: the path a kohya file names}: SDXL's LoRAs (sd-scripts' SdxlUNet2DConditionModel, ComfyUI,
    A1111) name UNet layers by their LDM paths (input_blocks.4.1.transformer_blocks.0.attn1.to_q), SD 1.x / 2.x
    ones by diffusers' paths, ours ({} = the path itself)."""
    if getattr(unet.config, "addition_embed_type", None) != "text_time":
        return {}
    names = _ldm_unet_names(unet)
    if not names:  # never write an SDXL file under names its readers do not know
        raise ValueError(f"no LDM names for the layers of this SDXL UNet ({type(unet).__name__})")
    return names


def kohya_modules(unet_loras, text_loras=None, text_loras_2=None, unet_paths=None):
    """(kohya name, wrapper) of every LoRA wrapper (SDXL: `text_loras_2` for the second text encoder,
    `unet_paths` = kohya_unet_paths)."""
    for part, loras in lora_parts(unet_loras, text_loras, text_loras_2).items():
        for path, m in loras.items():
            yield kohya_name((unet_paths or {}).get(path, path) if part == "unet" else path, part), m


def lora_state_dict(unet_loras, text_loras=None, dtype=torch.float32, text_loras_2=None, unet_paths=None):
    """Named tensors in kohya's format for the wrappers returned by inject_lora (SDXL: see kohya_modules)."""
    out = {}
    for k, m in kohya_modules(unet_loras, text_loras, text_loras_2, unet_paths):
        out[k + ".lora_down.weight"] = m.lora_down.weight.detach().to("cpu", dtype)
        out[k + ".lora_up.weight"] = m.lora_up.weight.detach().to("cpu", dtype)
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


def save_lora(path, tensors, metadata=None):
    """Write `tensors` (lora_state_dict) atomically, with string metadata plus kohya's ss_network_* keys
    (dim / alpha of the linear layers; a LoCon file's conv dim / alpha in ss_network_args, as sd-scripts)."""
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    downs = [(k[: -len(".lora_down.weight")], v) for k, v in tensors.items() if k.endswith(".lora_down.weight")]
    linear = next(((k, v) for k, v in downs if _spatial(v) == ()), None)
    conv = next(((k, v) for k, v in downs if _spatial(v) != ()), None)
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
    return {k: f.read(k) for k in f.entries}, f.metadata


# ---------------------------------------------------------------------------------------------------
# Reading other people's files: every key -> (part, module name, field)

KOHYA_FIELDS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha", "lora_mid.weight": "mid"}
# diffusers / peft key endings. `_lora.down.weight` is diffusers' pre-peft attention-processor form
# (`attn1.processor.to_q_lora.down.weight`), `lora_linear_layer` its text-encoder MLP form.
PEFT_FIELDS = [(re.compile(r"\.lora_A(\.[\w-]+)?\.weight$"), "down"),  # peft; `.default` = an adapter name
               (re.compile(r"\.lora_B(\.[\w-]+)?\.weight$"), "up"),
               (re.compile(r"\.lora(_linear_layer)?\.down\.weight$"), "down"),
               (re.compile(r"\.lora(_linear_layer)?\.up\.weight$"), "up"),
               (re.compile(r"_lora\.down\.weight$"), "down"), (re.compile(r"_lora\.up\.weight$"), "up"),
               (re.compile(r"\.alpha$"), "alpha")]
UNET_PATH_STARTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "time_embedding.")
# (key pattern, kind): LyCORIS / DoRA networks whose weight update is not (alpha / r) B A
OTHER_KINDS = ((r"dora_scale", "DoRA"), (r"lora_magnitude_vector", "DoRA"), (r"\.hada_", "LoHa (hada_)"),
               (r"\.lokr_", "LoKr (lokr_)"), (r"\.oft_", "OFT"), (r"\.on_input$", "IA3"), (r"\.[wb]_norm$", "norm"),
               (r"\.diff(_b)?$", "full-difference"), (r"\.a1\.weight$", "GLoRA"),
               (r"\.lora_B(\.[\w-]+)?\.bias$", "LoRA-bias"))
OTHER_FAMILIES = (("transformer.", "a DiT (SD3 / Flux)"),
                  ("lora_transformer_", "a DiT (SD3 / Flux)"), ("lora_unet_double_blocks_", "Flux"),
                  ("lora_unet_single_blocks_", "Flux"), ("lora_prior_", "Stable Cascade"))


def _diffusers_path(name, part):
    """A diffusers / peft module name in our paths: no `.processor.`, to_out -> to_out.0 (UNet),
    to_q / to_out -> q_proj / out_proj (CLIP text encoder)."""
    name = name.replace(".processor.", ".")
    if part in TEXT_PARTS:
        name = re.sub(r"self_attn\.to_(q|k|v)$", r"self_attn.\1_proj", name)
        return _text_path(re.sub(r"self_attn\.to_out$", "self_attn.out_proj", name))
    return re.sub(r"\.to_out$", ".to_out.0", name)


def _parse_key(k):
    """(part, module name, field, style) of a LoRA key, or None for a key of no known LoRA kind."""
    if k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")):
        name, _, field = k.partition(".")
        field = KOHYA_FIELDS.get(field)
        return (name[5:name.index("_", 5)], name, field, "kohya") if field else None
    if k.startswith(("unet.", "text_encoder.", "text_encoder_2.")):
        prefix, _, rest = k.partition(".")
        part = {"unet": "unet", "text_encoder": "te", "text_encoder_2": "te2"}[prefix]
    elif k.startswith(UNET_PATH_STARTS):  # diffusers' oldest attention-processor files have no prefix
        part, rest = "unet", k
    else:
        return None
    for pattern, field in PEFT_FIELDS:
        m = pattern.search(rest)
        if m:
            return part, _diffusers_path(rest[: m.start()], part), field, "peft"
    return None


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


def _group(tensors):
    """{(part, module name): {'down', 'up', 'alpha', 'mid', 'style'}} for kohya and diffusers/peft key styles.

    kohya: part 'unet'/'te' (SDXL: 'te1'/'te2'), name = the kohya name (resolved later against the model's paths).
    peft ('unet.<path>.lora_A.weight', 'text_encoder.<path>.lora_B.weight', SDXL's 'text_encoder_2.<path>...':
    part 'te2'): name = the dotted path.
    """
    _refuse_other_kinds(tensors)
    groups, bad = {}, []
    for k, v in tensors.items():
        parsed = _parse_key(k)
        if parsed is None:
            bad.append(k)
            continue
        part, name, field, style = parsed
        groups.setdefault((part, name), {"style": style})[field] = v
    if bad:
        raise UserError(f"LoRA file has {len(bad)} keys of an unsupported kind, e.g. {bad[:3]}")
    return groups


# ---------------------------------------------------------------------------------------------------
# The model's side: every name a LoRA may use for one of its layers

def _ldm_unet_names(model):
    """{our path: LDM path} (input_blocks.1.1.proj_in, ...) for a UNet, as older kohya / A1111 files name
    layers; {} for a model whose configuration we cannot read."""
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, UNetConfig):
        try:  # a diffusers UNet (tests) has a dict-like config
            cfg = UNetConfig.from_diffusers(dict(cfg))
        except Exception:
            return {}
    table = unet_rename_table(cfg)
    names = {}
    for path, _ in model.named_modules():
        ldm = unrename(path + ".weight", table) if path else None
        if ldm is not None:
            names[path] = ldm[: -len(".weight")]
    return names


def _module_table(model, part):
    """{kohya name: (path, module)} and {dotted path: same} for every module of `model` (UNet: also the
    kohya names of the LDM paths). A layer already wrapped by a LoRA is found under the wrapper's path
    and means its base.
    """
    wrappers = {p for p, m in model.named_modules() if isinstance(m, LoRALinear)}
    ldm = _ldm_unet_names(model) if part == "unet" else {}
    table, clashes = {}, set()
    for path, m in model.named_modules():
        if not path or path.rpartition(".")[0] in wrappers:
            continue
        entry = (path, m.base if isinstance(m, LoRALinear) else m)
        keys = [kohya_name(path, part)] + ([kohya_name(ldm[path], part)] if path in ldm else [])
        for key in keys:
            if key in table and table[key][0] != path:
                clashes.add(key)  # two paths that differ only in '.' vs '_': refuse to guess
            table[key] = entry
        table[_text_path(path) if part in TEXT_PARTS else path] = entry
    for key in clashes:
        table.pop(key)
    return table


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

def _spatial(t):
    """A tensor's kernel size, () for a Linear-like [out, in] or [out, in, 1, 1] weight."""
    k = tuple(t.shape[2:])
    return () if all(n == 1 for n in k) else k


def _checked(key, g, path, w):
    """(down, up, mid) of group `g` if its shapes fit the weight `w` of `path`, else a UserError."""
    down, up, mid = g["down"], g["up"], g.get("mid")
    rank = down.shape[0]
    ok = down.dim() in (2, 4) and up.dim() == down.dim() and tuple(up.shape[:2]) == (w.shape[0], rank) \
        and down.shape[1] == w.shape[1] and _spatial(up) == ()
    if mid is None:
        ok = ok and _spatial(down) == _spatial(w)
    else:  # LyCORIS LoCon with CP decomposition: 1x1 down, k x k mid [r, r, k, k], 1x1 up
        ok = ok and _spatial(down) == () and tuple(mid.shape[:2]) == (rank, rank) and _spatial(mid) == _spatial(w)
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
def _merge(w, down, up, mid, scale):
    """W += scale * B A (LoCon with mid: the CP composition of up, mid, down), in fp32, rounded once."""
    down, up = down.to(w.device, torch.float32), up.to(w.device, torch.float32)
    if mid is None:
        delta = lora_delta(up, down, scale, w.shape)
    else:
        mid = mid.to(w.device, torch.float32)
        delta = scale * torch.einsum("r s k l, o r, s i -> o i k l", mid, up.flatten(1), down.flatten(1))
    w.copy_((w.float() + delta).to(w.dtype))


def _text_tables(text_encoder, text_encoder_2, groups):
    """{part: text encoder} of the model, and `groups` with diffusers' SDXL `text_encoder.` (CLIP-L) as te1."""
    if text_encoder_2 is None:
        return {"te": text_encoder}, groups
    renamed = {("te1" if part == "te" else part, name): g for (part, name), g in groups.items()}
    return {"te1": text_encoder, "te2": text_encoder_2}, renamed


@torch.no_grad()
def apply_lora(unet, text_encoder, tensors, scale=1.0, merge=True, metadata=None, text_encoder_2=None):
    """Apply a LoRA file's tensors: W += scale * (alpha / r) * B A  (merge=True; LoCon convs: B A is the
    1x1-after-k x k composition), or wrap each layer with a LoRA module of multiplier `scale`
    (merge=False, strength changeable later). `metadata` (load_lora's second value) supplies the alpha
    of diffusers / peft files that keep it there. SDXL: `text_encoder_2` is OpenCLIP bigG (kohya's te2).

    Module names are found by converting each of the model's own module paths to kohya form (paths
    contain '_' themselves, e.g. 'to_q', 'transformer_blocks', so a key cannot be split back).
    Returns {(part, path): module}. Raises UserError naming keys that match no module.
    """
    groups = _group(tensors)
    _refuse_other_family(groups, _model_family(unet, text_encoder_2))
    texts, groups = _text_tables(text_encoder, text_encoder_2, groups)
    models = {"unet": unet} | texts
    tables = {part: _module_table(model, part) for part, model in models.items() if model is not None}
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
        rank = down.shape[0]
        alpha = _alpha(g, configs[part], _text_path(path) if part in TEXT_PARTS else path, rank)
        if merge:
            _merge(module.weight, down, up, mid, scale * alpha / rank)
            applied[(part, path)] = module
            continue
        model = models[part]
        if isinstance(model.get_submodule(path), LoRALinear):
            raise UserError(f"{path} already has a LoRA: pass merge=True to stack another one")
        if mid is not None:
            raise UserError(f"LoRA module {key} has a lora_mid (CP-decomposed LoCon): pass merge=True")
        lora = lora_class(module)(module, rank, alpha, multiplier=scale)
        lora.lora_down.weight.copy_(down.reshape(lora.lora_down.weight.shape))
        lora.lora_up.weight.copy_(up.reshape(lora.lora_up.weight.shape))
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
