"""Which layer a LoRA key means: kohya's names, diffusers / peft names and our module paths.

Kept apart because both the file and applying it need them: training writes its wrappers under kohya names,
and reading maps every foreign key back to one of the model's layers. Kohya names cannot be split back into
paths (paths contain '_' themselves: 'to_q', 'transformer_blocks'), so reading goes the other way: each of the
model's own paths (and, for a UNet, its LDM path from checkpoint_names' table) is converted to kohya form and
looked up (module_table).
"""
import re

from ..lora import LoRALinear
from ..unet import UNetConfig
from .checkpoint_names import unet_rename_table, unrename


# ---------------------------------------------------------------------------------------------------
# Writing: our module paths -> kohya names

TEXT_PARTS = ("te", "te1", "te2")  # kohya: SD 1.x / 2.x's one text encoder; SDXL's CLIP-L and OpenCLIP bigG


def text_path(path):
    # transformers 5's CLIPTextModel has no `.text_model` level; kohya names always include it.
    return path if path.startswith("text_model.") else "text_model." + path


def kohya_name(path, part):
    """'down_blocks.0.attentions.0...to_q', 'unet' -> 'lora_unet_down_blocks_0_attentions_0_..._to_q'."""
    if part in TEXT_PARTS:
        path = text_path(path)
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


# ---------------------------------------------------------------------------------------------------
# Reading: every key of a LoRA file -> (part, module name, field)

KOHYA_FIELDS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha", "lora_mid.weight": "mid",
                "dora_scale": "dora"}
# diffusers / peft key endings. `_lora.down.weight` is diffusers' pre-peft attention-processor form
# (`attn1.processor.to_q_lora.down.weight`), `lora_linear_layer` its text-encoder MLP form.
PEFT_FIELDS = [(re.compile(r"\.lora_A(\.[\w-]+)?\.weight$"), "down"),  # peft; `.default` = an adapter name
               (re.compile(r"\.lora_B(\.[\w-]+)?\.weight$"), "up"),
               (re.compile(r"\.lora(_linear_layer)?\.down\.weight$"), "down"),
               (re.compile(r"\.lora(_linear_layer)?\.up\.weight$"), "up"),
               (re.compile(r"_lora\.down\.weight$"), "down"), (re.compile(r"_lora\.up\.weight$"), "up"),
               (re.compile(r"\.alpha$"), "alpha"),
               (re.compile(r"\.lora_magnitude_vector(\.[\w-]+)?(\.weight)?$"), "dora")]  # peft's DoRA, [out]
UNET_PATH_STARTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "time_embedding.")


def _diffusers_path(name, part):
    """A diffusers / peft module name in our paths: no `.processor.`, to_out -> to_out.0 (UNet),
    to_q / to_out -> q_proj / out_proj (CLIP text encoder)."""
    name = name.replace(".processor.", ".")
    if part in TEXT_PARTS:
        name = re.sub(r"self_attn\.to_(q|k|v)$", r"self_attn.\1_proj", name)
        return text_path(re.sub(r"self_attn\.to_out$", "self_attn.out_proj", name))
    return re.sub(r"\.to_out$", ".to_out.0", name)


def parse_key(k):
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


def module_table(model, part):
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
        table[text_path(path) if part in TEXT_PARTS else path] = entry
    for key in clashes:
        table.pop(key)
    return table
