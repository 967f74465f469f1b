"""The evaluator models, CLIP and DINO: loaded from the Hugging Face Hub or a local folder, and the
embeddings the metrics of evaluation.py are computed from.

Loading is transformers' `from_pretrained` (Hub id or local folder; downloaded once into the HF cache,
which honours HF_ENDPOINT and HF_HUB_OFFLINE), with every failure turned into one UserError line. The
models run in fp32 even inside a training loop's autocast. `evaluate_epoch` embeds one set of images and
scores it; it lives here, not in evaluation.py, because it needs the models.
"""
import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import UserError
from .evaluation import clip_i_score, clip_t_score, dino_score, div_score, nearest_real_score, pres_score
from .preprocess import ImageSpec, config_size, image_spec, preprocess

CLIP_MODEL = "openai/clip-vit-base-patch32"  # the paper does not name its CLIP; ViT-B/32 is Textual Inversion's
DINO_MODEL = "facebook/dino-vits16"  # the paper's "ViT-S/16 DINO"
# the normalisation used when a model publishes no preprocessor_config.json
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class Evaluators:
    """The CLIP and DINO models (fp32, eval mode) with their preprocessing; from `load_evaluators`."""
    clip: object
    tokenizer: object
    clip_spec: ImageSpec
    dino: object
    dino_spec: ImageSpec
    device: str = "cpu"
    batch_size: int = 32
    progress: bool = True


@dataclass
class RealEmbeddings:
    """DINO and CLIP embeddings of the real subject photos, computed once per run (`embed_real`)."""
    dino: torch.Tensor
    clip: torch.Tensor


def _offline():
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _load_failed(what, flag, name, error):
    """The one-line UserError for an evaluator that cannot be loaded."""
    if Path(name).exists():
        return UserError(f"{flag} {name}: cannot load the {what} model from this folder: "
                         f"{str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__}")
    where = ("HF_HUB_OFFLINE is set and it is not in the Hugging Face cache" if _offline() else
             "it is neither a local folder nor a model the Hugging Face Hub could give (no network? wrong id?)")
    return UserError(f"{flag} {name!r}: cannot load the {what} model: {where}; download it once with network "
                     f"(it is then cached), or pass a local folder saved with save_pretrained")


def _preprocessor_config(name):
    """preprocessor_config.json of a local folder or Hub model as a dict, or None when it has none."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    local = Path(name)
    try:
        path = local / "preprocessor_config.json" if local.is_dir() else Path(hf_hub_download(name, "preprocessor_config.json"))
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError, HfHubHTTPError):  # none published: the standard means are used
        return None


def _from_pretrained(what, flag, name, kinds, load):
    """Config check, then `load(config)`; every loading failure becomes one UserError line."""
    from huggingface_hub.errors import HfHubHTTPError
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError, KeyError, HfHubHTTPError) as e:
        raise _load_failed(what, flag, name, e) from None
    if config.model_type not in kinds:
        raise UserError(f"{flag} {name}: a {config.model_type!r} model, not a {what} model ({', '.join(kinds)})")
    try:
        return config, load(config)
    except (OSError, ValueError, KeyError, HfHubHTTPError) as e:
        raise _load_failed(what, flag, name, e) from None


def _ready(model, device):
    model = model.to(device=device, dtype=torch.float32).eval()
    model.requires_grad_(False)
    return model


@contextlib.contextmanager
def quiet_hub():
    """huggingface_hub logs every retry of a Hub it cannot reach as a warning line on stderr; a failure to
    load becomes our own one `error:` line, so its warnings are silenced while the evaluators load. (Its
    first import sets its log level: so it is imported before the level is changed.)"""
    from huggingface_hub.utils import logging as hub_logging

    level = hub_logging.get_verbosity()
    hub_logging.set_verbosity(hub_logging.ERROR)
    try:
        yield
    finally:
        hub_logging.set_verbosity(level)


@quiet_hub()
def load_evaluators(clip_model=CLIP_MODEL, dino_model=DINO_MODEL, device=None, batch_size=32, progress=True):
    """CLIP (image + text towers) and DINO ViT by Hub id or local folder, in fp32 on `device`."""
    from transformers import AutoModel, AutoTokenizer, CLIPModel, ViTModel

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    clip_cfg, (clip, tokenizer) = _from_pretrained(
        "CLIP", "--clip-model", clip_model, ("clip",),
        lambda c: (CLIPModel.from_pretrained(clip_model, config=c), AutoTokenizer.from_pretrained(clip_model)))
    # ViTModel's pooler is not part of DINO (and absent from its checkpoint): the CLS token is the embedding.
    dino_cfg, dino = _from_pretrained(
        "DINO", "--dino-model", dino_model, ("vit", "dinov2"),
        lambda c: ViTModel.from_pretrained(dino_model, config=c, add_pooling_layer=False) if c.model_type == "vit"
        else AutoModel.from_pretrained(dino_model, config=c))
    clip_spec = image_spec(_preprocessor_config(clip_model), clip_cfg.vision_config.image_size, CLIP_MEAN, CLIP_STD)
    dino_pre = _preprocessor_config(dino_model)
    # DINOv2 interpolates its position embeddings (trained at 518, used at its processor's 224 crop);
    # a ViT takes only its own image_size.
    dino_size = (config_size((dino_pre or {}).get("crop_size")) or 224) if dino_cfg.model_type == "dinov2" else dino_cfg.image_size
    dino_spec = image_spec(dino_pre, dino_size, IMAGENET_MEAN, IMAGENET_STD)
    return Evaluators(_ready(clip, device), tokenizer, clip_spec, _ready(dino, device), dino_spec, str(device),
                      batch_size, progress)


@torch.no_grad()
def embed_images(encode, images, spec, device, batch_size=32, desc="embedding", progress=True):
    """[N, D] fp32 CPU embeddings of PIL images, `batch_size` at a time, with a progress bar."""
    if not images:
        raise ValueError("no images to embed")
    out = []
    device_type = torch.device(device).type
    with tqdm(total=len(images), desc=desc, unit="img", disable=not progress, leave=False) as bar, \
            torch.autocast(device_type, enabled=False):  # fp32 even inside a training loop's autocast
        for i in range(0, len(images), batch_size):
            x = preprocess(images[i:i + batch_size], spec).to(device)
            out.append(encode(x).float().cpu())
            bar.update(len(x))
    return torch.cat(out)


def dino_embeddings(ev, images):
    """DINO CLS embeddings [N, D] (after the final LayerNorm, as DINO's own evaluation uses them)."""
    return embed_images(lambda x: ev.dino(pixel_values=x).last_hidden_state[:, 0], images, ev.dino_spec,
                        ev.device, ev.batch_size, "DINO", ev.progress)


def clip_image_embeddings(ev, images):
    """CLIP image embeddings [N, P]: the projected pooled CLS token (CLIPModel.get_image_features)."""
    encode = lambda x: ev.clip.visual_projection(ev.clip.vision_model(pixel_values=x).pooler_output)
    return embed_images(encode, images, ev.clip_spec, ev.device, ev.batch_size, "CLIP", ev.progress)


@torch.no_grad()
def clip_text_embeddings(ev, prompts):
    """CLIP text embeddings [N, P]: the projected EOS token (CLIPModel.get_text_features); prompts longer
    than the context (77 tokens) are cut."""
    n = ev.clip.config.text_config.max_position_embeddings
    tokens = ev.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=n, return_tensors="pt")
    with torch.autocast(torch.device(ev.device).type, enabled=False):
        out = ev.clip.text_model(input_ids=tokens["input_ids"].to(ev.device),
                                 attention_mask=tokens["attention_mask"].to(ev.device)).pooler_output
        return ev.clip.text_projection(out).float().cpu()


def embed_real(ev, images):
    """Embed the real subject photos once, for many `evaluate_epoch` calls."""
    return RealEmbeddings(dino_embeddings(ev, images), clip_image_embeddings(ev, images))


def evaluate_epoch(evaluators, real_images, generated_images, prompt, class_images=None):
    """DINO, CLIP-I, CLIP-T, DINO-NN, DIV (>= 2 images) and PRES (with `class_images`) of one set.

    real_images: PIL images, or `embed_real`'s result (to embed the photos once per run).
    prompt: the prompt of every generated image, or a list with one prompt per image.
    class_images: the fine-tuned model's images of the plain class prompt, for PRES.
    """
    ev = evaluators
    real = real_images if isinstance(real_images, RealEmbeddings) else embed_real(ev, list(real_images))
    generated = list(generated_images)
    g_dino, g_clip = dino_embeddings(ev, generated), clip_image_embeddings(ev, generated)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if len(prompts) not in (1, len(generated)):
        raise ValueError(f"{len(prompts)} prompts for {len(generated)} generated images")
    out = {"dino": dino_score(g_dino, real.dino), "clip_i": clip_i_score(g_clip, real.clip),
           "clip_t": clip_t_score(g_clip, clip_text_embeddings(ev, prompts)),
           "dino_nn": nearest_real_score(g_dino, real.dino)}
    if len(prompts) == 1:
        prompts = prompts * len(generated)
    groups = [[i for i, p in enumerate(prompts) if p == q] for q in dict.fromkeys(prompts)]
    divs = [div_score(g_dino[g]) for g in groups if len(g) >= 2]  # diversity among images of one prompt
    if divs:
        out["div"] = sum(divs) / len(divs)
    if class_images:
        out["pres"] = pres_score(dino_embeddings(ev, list(class_images)), real.dino)
    return out
