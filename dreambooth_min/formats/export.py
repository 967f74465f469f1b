"""Write our own modules as a diffusers-layout folder, without diffusers.

The folder is what `checkpoint.load()` reads and what diffusers' `StableDiffusionPipeline.from_pretrained`
reads: model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/. Our UNet and VAE already
use diffusers' parameter names, so only the configs need translating. The whole folder is written
beside its destination and renamed into place, so an interrupted save never leaves half a model.
"""
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from ..errors import UserError
from ..model import RANDOM_NOTE
from ..sampling import DDIM_DEFAULTS, SD_SCHEDULE
from ..scheduler import PREDICTION_TYPES
from ..text import PAD_TOKEN, TOKENIZER_DIR
from .safetensors_io import save_atomic

DIFFUSERS_VERSION = "0.30.0"  # the config format written here; any diffusers since 0.30 reads it
# The released SD 1.x / 2.x DDIM scheduler settings (what diffusers' SD repos hold): SD's schedule and DDIM's.
SCHEDULER = dict(_class_name="DDIMScheduler", _diffusers_version=DIFFUSERS_VERSION, **DDIM_DEFAULTS,
                 **{k: v for k, v in SD_SCHEDULE.items() if k not in ("thresholding", "rescale_betas_zero_snr")})
MODEL_INDEX = dict(_class_name="StableDiffusionPipeline", _diffusers_version=DIFFUSERS_VERSION,
                   unet=["diffusers", "UNet2DConditionModel"], vae=["diffusers", "AutoencoderKL"],
                   text_encoder=["transformers", "CLIPTextModel"], tokenizer=["transformers", "CLIPTokenizer"],
                   scheduler=["diffusers", "DDIMScheduler"], safety_checker=[None, None],
                   feature_extractor=[None, None], requires_safety_checker=False)
# SDXL: two text encoders and tokenizers; an empty negative prompt is zeros (model.py sampling_conds).
SDXL_MODEL_INDEX = dict(_class_name="StableDiffusionXLPipeline", _diffusers_version=DIFFUSERS_VERSION,
                        unet=MODEL_INDEX["unet"], vae=MODEL_INDEX["vae"], text_encoder=MODEL_INDEX["text_encoder"],
                        tokenizer=MODEL_INDEX["tokenizer"], scheduler=MODEL_INDEX["scheduler"],
                        text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                        tokenizer_2=["transformers", "CLIPTokenizer"],
                        force_zeros_for_empty_prompt=True)


def unet_config_json(cfg, sample_size=64):
    """diffusers' unet/config.json for our UNetConfig.

    diffusers' `attention_head_dim` key holds the number of heads per level (a historical misnomer kept
    for SD 1.x configs); `num_attention_heads` must stay unset, diffusers' UNet2DConditionModel refuses it.
    """
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels)]
    depth = cfg.transformer_layers_per_block
    return dict(_class_name="UNet2DConditionModel", _diffusers_version=DIFFUSERS_VERSION, sample_size=sample_size,
                in_channels=cfg.in_channels, out_channels=cfg.out_channels, down_block_types=down,
                up_block_types=up, mid_block_type="UNetMidBlock2DCrossAttn",
                block_out_channels=list(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
                attention_head_dim=list(cfg.num_attention_heads), cross_attention_dim=cfg.cross_attention_dim,
                use_linear_projection=cfg.use_linear_projection, upcast_attention=cfg.upcast_attention,
                norm_num_groups=cfg.norm_num_groups, norm_eps=1e-5, act_fn="silu", flip_sin_to_cos=True,
                freq_shift=0, downsample_padding=1, center_input_sample=False,
                transformer_layers_per_block=depth if isinstance(depth, int) else list(depth),
                **({} if cfg.addition_embed_type is None else dict(  # SDXL's pooled text + size ids
                    addition_embed_type=cfg.addition_embed_type, addition_time_embed_dim=cfg.addition_time_embed_dim,
                    projection_class_embeddings_input_dim=cfg.projection_class_embeddings_input_dim)))


def vae_config_json(cfg, sample_size=512):
    """diffusers' vae/config.json for our VAEConfig."""
    d = asdict(cfg)
    n = len(cfg.block_out_channels)
    return dict(_class_name="AutoencoderKL", _diffusers_version=DIFFUSERS_VERSION, sample_size=sample_size,
                down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
                act_fn="silu", **{k: list(v) if isinstance(v, tuple) else v for k, v in d.items()})


def _write_json(path, obj):
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _write_tokenizer(folder, version):
    """Our packaged BPE files plus the config transformers' CLIPTokenizer.from_pretrained needs: without
    model_max_length=77 diffusers would pad prompts to a huge length."""
    folder.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(TOKENIZER_DIR / name, folder / name)
    special = dict(bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                   pad_token=PAD_TOKEN[version])
    _write_json(folder / "tokenizer_config.json", dict(special, tokenizer_class="CLIPTokenizer", model_max_length=77,
                                                       do_lower_case=True, clean_up_tokenization_spaces=True))
    _write_json(folder / "special_tokens_map.json", special)


def _write_into(tmp, unet, vae, text_encoder, version, prediction_type, sample_size, note, text_encoder_2=None):
    for sub in ("unet", "vae", "scheduler"):
        (tmp / sub).mkdir()
    index = MODEL_INDEX if text_encoder_2 is None else SDXL_MODEL_INDEX
    _write_json(tmp / "model_index.json", index | ({RANDOM_NOTE: note} if note else {}))
    _write_json(tmp / "unet" / "config.json", unet_config_json(unet.config, sample_size))
    save_atomic({k: v.detach().cpu() for k, v in unet.state_dict().items()},
                tmp / "unet" / "diffusion_pytorch_model.safetensors")
    _write_json(tmp / "vae" / "config.json", vae_config_json(vae.config, sample_size * 8))
    save_atomic({k: v.detach().cpu() for k, v in vae.state_dict().items()},
                tmp / "vae" / "diffusion_pytorch_model.safetensors")
    text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
    _write_tokenizer(tmp / "tokenizer", "sd1" if version == "sdxl" else version)
    if text_encoder_2 is not None:  # OpenCLIP bigG pads with "!" as SD 2.x
        text_encoder_2.save_pretrained(tmp / "text_encoder_2", safe_serialization=True)
        _write_tokenizer(tmp / "tokenizer_2", "sd2")
    _write_json(tmp / "scheduler" / "scheduler_config.json", dict(SCHEDULER, prediction_type=prediction_type))


def save_diffusers_folder(path, unet, vae, text_encoder, version, prediction_type, sample_size=None, note=None,
                          text_encoder_2=None):
    """Save our UNet and VAE and a transformers CLIPTextModel as a diffusers Stable Diffusion folder.

    `version` "sd1" | "sd2" picks the tokenizer's pad token (SD 2.x pads with "!", id 0);
    `prediction_type` "epsilon" | "v_prediction" goes into the scheduler config, where `load()` reads it.
    `sample_size` is the latent side diffusers uses as its default image size / 8 (64, or 96 for SD 2.x
    v-models). `note` marks a model of random weights (make_tiny): load() reads it into `sd.random_note`,
    and the commands say it. An existing diffusers folder (or empty folder) at `path` is replaced; anything else is refused.
    SDXL (`version` "sdxl"): `text_encoder_2` is the CLIPTextModelWithProjection (bigG).
    """
    if (version == "sdxl") != (text_encoder_2 is not None) or version not in (*PAD_TOKEN, "sdxl"):
        raise UserError(f"version must be one of {', '.join(PAD_TOKEN)}, or sdxl with text_encoder_2, not {version!r}")
    if prediction_type not in PREDICTION_TYPES:
        raise UserError(f"prediction type must be {' or '.join(PREDICTION_TYPES)}, not {prediction_type!r}")
    path = Path(path)
    if path.exists() and not (path.is_dir() and ((path / "model_index.json").exists() or not any(path.iterdir()))):
        raise UserError(f"{path} exists and is not a diffusers model folder: not overwriting it")
    if sample_size is None:
        sample_size = 128 if version == "sdxl" else 96 if version == "sd2" and prediction_type == "v_prediction" else 64
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        _write_into(tmp, unet, vae, text_encoder, version, prediction_type, sample_size, note, text_encoder_2)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes the folder private; give the usual permissions
        if path.exists():  # a folder cannot be replaced in one rename: move the old one aside first
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.replace(path, old / "model")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask
