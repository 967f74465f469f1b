"""Load Stable Diffusion 1.x / 2.x / XL checkpoints into our modules: `load()` and the path to a built model.

One way through, read top to bottom: `load` -> `_load_single_file` or `_load_folder`, each of which detects the
family (checkpoint_sdxl: SDXL base, or SD 1.x / 2.x; the refiner, SD3 and Flux refused), reads the configuration
(a single file: from its tensors' shapes) and the rename table (checkpoint_names), then builds the modules on the
meta device and fills them (fill.py; the text encoders: text_weights). What SDXL adds is in checkpoint_sdxl.py.

Two layouts are read:
- a single `.safetensors` file in the original LDM layout (what A1111 and ComfyUI load), whose keys are
  renamed to ours by the one table in `checkpoint_names` (`unet_rename_table` / `vae_rename_table`);
- a diffusers folder (`model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`),
  whose keys already are ours.

A single file's sizes and head counts are read from its tensors' shapes (checkpoint_names' docstring).

SD 1.x or 2.x: a linear proj_in (LDM `use_linear_in_transformer`) means SD 2.x.
Prediction type: SD 1.x is epsilon. A diffusers folder says it in scheduler/scheduler_config.json. For an
SD 2.x single file the weights cannot tell (the 768-v and 512-base UNets have the same shapes), so we
follow the file's neighbours and name: a `<name>.yaml` beside it with `parameterization: "v"` means v,
one without it means epsilon (A1111's convention); otherwise a name containing "512" or "base" means
epsilon, anything else v_prediction (the 768 models). `prediction_type=` overrides all of this.
"""
import json
import re
from pathlib import Path

import torch

from ..errors import UserError
from ..model import RANDOM_NOTE, StableDiffusion
from ..scheduler import PREDICTION_TYPES
from ..text import load_tokenizer
from ..unet import UNet2DConditionModel, UNetConfig
from ..vae import AutoencoderKL, VAEConfig
from . import checkpoint_sdxl as sdxl
from .checkpoint_names import (HF_CLIP_PREFIX, OPEN_CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, infer_unet_config,
                               infer_vae_config, rename, unet_rename_table, vae_rename_table)
from .fill import build, fill
from .hub import DEFAULT_MODEL, resolve_model
from .safetensors_io import PICKLE_HINT, SafetensorsFile
from .text_weights import convert_open_clip, load_text, text_config_from_json


def load(path, dtype=torch.float32, device="cpu", prediction_type=None, revision=None, log=print):
    """Load a Stable Diffusion 1.x / 2.x / XL checkpoint: a single LDM `.safetensors` file or a diffusers folder,
    or a model by name (a Hub repo id, `owner/repo/file.safetensors`, a short name such as "sd15"), which
    hub.resolve_model fetches into the Hugging Face cache at `revision` (see hub.py).

    Weights stored in fp16/bf16 are cast to `dtype` (but SDXL's VAE stays fp32 when `dtype` is fp16). Extra tensors (DDPM buffers, `model_ema.*`) are
    ignored; missing or mis-shaped ones raise UserError naming them. `sd.source` records where the model
    came from: {"path"} or {"repo_id", "revision" (commit sha), "file"}.
    """
    path, source = resolve_model(path, revision, prefer_fp16=dtype == torch.float16, log=log)
    if prediction_type not in (None, *PREDICTION_TYPES):
        raise UserError(f"prediction type must be one of {', '.join(PREDICTION_TYPES)}, not {prediction_type!r}")
    if path.is_dir():
        parts = _load_folder(path, dtype, device)
    elif path.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin"):
        raise UserError(f"{path}: {PICKLE_HINT}")
    else:
        parts = _load_single_file(path, dtype, device)
    if prediction_type is not None:
        parts["prediction_type"] = prediction_type
    if parts["prediction_type"] not in PREDICTION_TYPES:
        raise UserError(f"{path}: unsupported prediction type {parts['prediction_type']!r}")
    if "repo_id" in source:  # named by its repo (or file), not by the cache folder's commit sha
        name = Path(source["file"]).stem if source["file"] else source["repo_id"]
    else:
        name = path.stem if path.is_file() else path.name
    sd = StableDiffusion(**parts, name=name)
    sd.source = source
    return sd


# ---------------------------------------------------------------------------------------------------
# A single LDM file: family, configurations from the shapes, rename tables, build and fill

def _load_single_file(path, dtype, device):
    f = SafetensorsFile(path)
    shapes = f.shapes
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in shapes):
        raise UserError(f"{path} is a LoRA file, not a model: pass it with --lora")
    is_xl = sdxl.single_file_family(path, shapes) == "sdxl"  # refuses the refiner, SD3, Flux
    unet_shapes, vae_shapes = _under(shapes, UNET_PREFIX), _under(shapes, VAE_PREFIX)
    if not unet_shapes or not vae_shapes:
        raise UserError(f"{path} is not a Stable Diffusion checkpoint: no {UNET_PREFIX if not unet_shapes else VAE_PREFIX}* "
                        "tensors (a UNet- or VAE-only file cannot be loaded alone)")
    pooled = shapes.get(sdxl.BIGG_PREFIX + "text_projection", (None, None))[1]
    unet_cfg, vae_cfg = infer_unet_config(unet_shapes, pooled_dim=pooled, **_yaml_heads(path)), infer_vae_config(vae_shapes)
    version = "sdxl" if is_xl else "sd2" if unet_cfg.use_linear_projection else "sd1"
    if is_xl:
        vae_cfg.scaling_factor = sdxl.VAE_SCALING_FACTOR
    unet = _build_renamed(f, UNet2DConditionModel, unet_cfg, UNET_PREFIX, unet_shapes, unet_rename_table(unet_cfg),
                          "UNet", dtype, device)
    vae = _build_renamed(f, AutoencoderKL, vae_cfg, VAE_PREFIX, vae_shapes, vae_rename_table(vae_cfg), "VAE",
                         sdxl.vae_dtype(dtype) if is_xl else dtype, device)
    return dict(unet=unet, vae=vae, version=version, **_single_file_text(f, version, dtype, device),
                prediction_type=_single_file_prediction_type(path, version), scheduler_config={})


def _under(shapes, prefix):
    """{key without `prefix`: shape} of the tensors under `prefix`."""
    return {k[len(prefix):]: s for k, s in shapes.items() if k.startswith(prefix)}


def _build_renamed(f, cls, cfg, prefix, part_shapes, table, what, dtype, device):
    """The module `cls(cfg)` built on the meta device and filled from file `f`'s tensors `prefix` + key,
    each renamed to ours by `table`."""
    module = build(cls, cfg, dtype, device)
    sources = []
    for key in part_shapes:
        ours = rename(key, table)
        if ours is None:
            raise UserError(f"unknown {what} architecture: no rename for {prefix}{key}")
        sources.append((ours, lambda out, k=prefix + key: f.read(k, out)))
    return fill(module, sources, what).eval().requires_grad_(False)


def _single_file_text(f, version, dtype, device):
    """The text encoder(s) and tokenizer(s) of a single file, as StableDiffusion fields."""
    if version == "sdxl":
        text_encoder, text_encoder_2 = sdxl.load_text_single_file(f, dtype, device)
        return dict(text_encoder=text_encoder, tokenizer=load_tokenizer("sd1"),  # CLIP-L pads with EOS
                    text_encoder_2=text_encoder_2, tokenizer_2=load_tokenizer("sd2"))  # OpenCLIP with "!"
    shapes = f.shapes
    if open_clip := _under(shapes, OPEN_CLIP_PREFIX):
        text_tensors = convert_open_clip({k: f.read(OPEN_CLIP_PREFIX + k) for k in open_clip
                                          if k != "attn_mask"})  # unused, and -inf by design: not read
    elif clip := _under(shapes, HF_CLIP_PREFIX):
        text_tensors = {k: f.read(HF_CLIP_PREFIX + k) for k in clip}
    else:
        raise UserError(f"{f.path} has no text encoder ({HF_CLIP_PREFIX}* or {OPEN_CLIP_PREFIX}*)")
    return dict(text_encoder=load_text(text_tensors, version, dtype, device), tokenizer=load_tokenizer(version))


def _yaml_heads(path):
    """num_heads / num_head_channels from the LDM config `<name>.yaml` beside a single file, if any
    (read with a regular expression: the keys are unique in those configs, and we need no YAML parser)."""
    yaml = path.with_suffix(".yaml")
    text = yaml.read_text() if yaml.exists() else ""
    found = {k: int(m.group(1)) for k in ("num_heads", "num_head_channels")
             if (m := re.search(rf"^\s*{k}:\s*(-?\d+)", text, re.M))}
    if found.get("num_head_channels", -1) <= 0:
        found.pop("num_head_channels", None)
    return found


def _single_file_prediction_type(path, version):
    if version != "sd2":  # SD 1.x and SDXL base are epsilon models
        return "epsilon"
    yaml = path.with_suffix(".yaml")
    if yaml.exists():
        return "v_prediction" if re.search(r"parameterization:\s*[\"']?v[\"']?\s*$", yaml.read_text(), re.M) else "epsilon"
    return "epsilon" if re.search(r"512|base", path.name, re.I) else "v_prediction"


# ---------------------------------------------------------------------------------------------------
# A diffusers folder: family, each component's config.json, build and fill (its keys already are ours)

def _load_folder(path, dtype, device):
    if not (path / "model_index.json").exists():
        raise UserError(f"{path} is a folder but not a diffusers model folder (no model_index.json); "
                        "pass a .safetensors file or a diffusers folder")
    model_index = _read_json(path / "model_index.json")
    is_xl = sdxl.folder_family(path, model_index) == "sdxl"  # refuses refiner, SD3, ...
    unet = _build_component(path, "unet", UNet2DConditionModel, UNetConfig, "UNet", dtype, device)
    vae = _build_component(path, "vae", AutoencoderKL, VAEConfig, "VAE", sdxl.vae_dtype(dtype) if is_xl else dtype,
                           device)
    version = "sdxl" if is_xl else "sd2" if unet.config.use_linear_projection else "sd1"
    text = dict(text_encoder=_folder_text(path, "text_encoder", "sd2" if version == "sd2" else "sd1", dtype, device))
    if is_xl:
        text["text_encoder_2"] = _folder_text(path, "text_encoder_2", "sd2", dtype, device, with_projection=True)
    for sub, field, pad in (("tokenizer", "tokenizer", "sd2" if version == "sd2" else "sd1"),
                            ("tokenizer_2", "tokenizer_2", "sd2")):
        if field == "tokenizer" or is_xl:  # SDXL: tokenizer/ pads with EOS, tokenizer_2/ with "!"
            text[field] = load_tokenizer(pad, path / sub if (path / sub).is_dir() else None)
    scheduler_config = {}
    if (path / "scheduler" / "scheduler_config.json").exists():
        scheduler_config = _read_json(path / "scheduler" / "scheduler_config.json")
    return dict(unet=unet, vae=vae, **text, version=version, scheduler_config=scheduler_config,
                prediction_type=scheduler_config.get("prediction_type", "epsilon"),
                random_note=str(model_index.get(RANDOM_NOTE, "")))


def _build_component(path, sub, cls, cfg_cls, what, dtype, device):
    """The module of component folder `sub` (unet/, vae/): built from its config.json, filled from its weights."""
    f = _weights_file(path / sub)
    module = build(cls, cfg_cls.from_diffusers(_read_json(path / sub / "config.json")), dtype, device)
    return fill(module, ((k, lambda out, k=k: f.read(k, out)) for k in f.entries), what).eval().requires_grad_(False)


def _folder_text(path, sub, version, dtype, device, with_projection=False):
    """A text encoder from a diffusers component folder (text_encoder/ or SDXL's text_encoder_2/)."""
    from transformers import CLIPTextModelWithProjection

    f = _weights_file(path / sub)
    tensors, config = {k: f.read(k) for k in f.entries}, text_config_from_json(_read_json(path / sub / "config.json"))
    if with_projection:
        return load_text(tensors, version, dtype, device, config, cls=CLIPTextModelWithProjection)
    return load_text(tensors, version, dtype, device, config)


def _weights_file(folder):
    """The one safetensors weight file of a diffusers component folder."""
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors",
                 "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors"):
        if (folder / name).exists():
            return SafetensorsFile(folder / name)
    if any(folder.glob("*.bin")) or any(folder.glob("*.ckpt")):
        raise UserError(f"{folder}: {PICKLE_HINT}")
    raise UserError(f"{folder} has no .safetensors weights")


def _read_json(path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is missing: the diffusers folder is incomplete") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None


# ---------------------------------------------------------------------------------------------------
# Without --model

def find_default_model(folder=None):
    """The one model in weights/ (a .safetensors file or a diffusers folder), for commands run without --model;
    with none there, the short name of the Hub's SD 1.5 (hub.DEFAULT_MODEL, "sd15"), which load() resolves.

    weights/ is looked for in the current folder, then beside the package (the project's own weights/).
    """
    if folder is None:
        here, project = Path("weights"), Path(__file__).resolve().parents[2] / "weights"
        folder = here if here.is_dir() or not project.is_dir() else project
    folder = Path(folder)
    found = sorted(folder.glob("*.safetensors")) + sorted(p.parent for p in folder.glob("*/model_index.json"))
    pickles = sorted(p for ext in ("*.ckpt", "*.pt", "*.pth", "*.bin") for p in folder.glob(ext))
    if not found and pickles:
        raise UserError(f"{pickles[0]}: {PICKLE_HINT}")
    if not found:  # a fresh clone: the Hub's SD 1.5, downloaded once into the Hugging Face cache by load()
        return DEFAULT_MODEL
    if len(found) > 1:
        raise UserError(f"several models in {folder.absolute()}/ ({', '.join(p.name for p in found)}): "
                        "choose one with --model")
    return found[0]
