"""Subject fidelity as the DreamBooth paper measures it (Ruiz et al. 2023, sec. 4.1 and Table 1).

With e_dino(x) the CLS embedding of DINO ViT-S/16 (self-supervised; it tells apart two dogs of one breed,
which CLIP tends to merge), e_img / e_txt CLIP's projected image / text embeddings, G the generated
images, R the real subject photos and cos the cosine similarity:

    DINO   = mean over (g, r) in G x R of cos(e_dino(g), e_dino(r))      subject fidelity, the paper's preferred one
    CLIP-I = the same with e_img                                           subject fidelity
    CLIP-T = mean over g in G of cos(e_txt(prompt), e_img(g))              prompt fidelity, a cosine (paper: 0.305;
                                                                           the "CLIP score" of other papers is 100x)
    PRES   = DINO between the fine-tuned model's images of the plain class prompt ("a photo of dog") and R:
             lower = the class drifted less towards the subject (prior preservation, paper sec. 4.3)
    DIV    = 1 - mean over g != g' in G of cos(e_dino(g), e_dino(g')), among the images of one prompt.
             The paper's DIV is 1 - LPIPS similarity; LPIPS needs weights transformers does not ship, so
             ours is the DINO analogue: 0 = all images look alike, higher = more varied. Not comparable
             with the paper's numbers, only between our own runs.
    DINO-NN (extra, not in the paper) = mean over g of max over r of cos(e_dino(g), e_dino(r)): how close
             each image is to its nearest training photo. It reaches 1 when images copy a photo.

"Pairwise" is over all pairs, so a set scored against itself gets less than 1 unless all its images are
one image: for the paper's real photos DINO is 0.774 and CLIP-I 0.885. All math is fp32. Evaluator
models come from transformers' `from_pretrained` (Hub id or local folder; downloaded once into the HF
cache, which honours HF_ENDPOINT and HF_HUB_OFFLINE); images are preprocessed here in torch (short side
resized, centre crop, the model's mean / std) so that torchvision is not needed.
"""
import contextlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps
from tqdm.auto import tqdm

from ..errors import UserError
from ..formats.safetensors_io import atomic_path
from .report import read_jsonl
from ..formats.images import find_images, to_rgb
from ..formats.png import save_png

CLIP_MODEL = "openai/clip-vit-base-patch32"  # the paper does not name its CLIP; ViT-B/32 is Textual Inversion's
DINO_MODEL = "facebook/dino-vits16"  # the paper's "ViT-S/16 DINO"
CLIP_T_MARGIN = 0.01  # best-epoch rule: CLIP-T may lose at most this much (absolute cosine) to its maximum
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
METRICS = ("dino", "clip_i", "clip_t", "pres", "div", "dino_nn")


# ---------------------------------------------------------------------------------------------------
# Metric math: embeddings [N, D] in, Python floats out

def normalize(x, eps=1e-12):
    """Rows scaled to unit length, in fp32."""
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def cosine_matrix(a, b):
    """[Na, Nb] cosines between the rows of a and of b."""
    return normalize(a) @ normalize(b).T


def mean_pairwise_cosine(a, b):
    """Mean cosine over all Na x Nb pairs (a row of a with a row of b)."""
    if len(a) == 0 or len(b) == 0:
        raise ValueError("mean_pairwise_cosine needs at least one row in each set")
    return cosine_matrix(a, b).mean().item()


def mean_cosine_within(a):
    """Mean cosine over the N (N - 1) ordered pairs of distinct rows of a (the diagonal left out)."""
    n = len(a)
    if n < 2:
        raise ValueError("mean_cosine_within needs at least two rows")
    c = cosine_matrix(a, a)
    return ((c.sum() - c.diagonal().sum()) / (n * (n - 1))).item()


def dino_score(generated, real):
    """DINO: mean pairwise cosine of generated and real DINO embeddings (paper sec. 4.1)."""
    return mean_pairwise_cosine(generated, real)


def clip_i_score(generated, real):
    """CLIP-I: mean pairwise cosine of generated and real CLIP image embeddings."""
    return mean_pairwise_cosine(generated, real)


def clip_t_score(image_embeddings, text_embeddings):
    """CLIP-T: mean cosine of each image's CLIP embedding with its prompt's ([1, D] for one prompt
    shared by all images, or one row per image). A cosine in [-1, 1], as the paper's 0.305."""
    if len(text_embeddings) not in (1, len(image_embeddings)):
        raise ValueError(f"{len(text_embeddings)} prompt embeddings for {len(image_embeddings)} images")
    return (normalize(image_embeddings) * normalize(text_embeddings)).sum(-1).mean().item()


def pres_score(class_generated, real):
    """PRES: DINO between the fine-tuned model's plain-class images and the real subject (lower = less drift)."""
    return mean_pairwise_cosine(class_generated, real)


def div_score(generated):
    """DIV (our DINO version, see the module docstring): 1 - mean DINO cosine among images of one prompt."""
    return 1.0 - mean_cosine_within(generated)


def nearest_real_score(generated, real):
    """DINO-NN: mean over generated images of the cosine to the nearest real image (1 = copies)."""
    return cosine_matrix(generated, real).max(dim=1).values.mean().item()


# ---------------------------------------------------------------------------------------------------
# Best epoch

def best_epoch(records, margin=CLIP_T_MARGIN):
    """The record with the highest DINO among those whose CLIP-T is within `margin` of the best CLIP-T.

    Why: DINO alone keeps rising while the model learns to copy the photos, and the prompt is then
    ignored (CLIP-T falls). The earliest epoch wins a tie. None when no record has both numbers.
    """
    rows = [r for r in records if _finite(r.get("dino")) and _finite(r.get("clip_t"))]
    if not rows:
        return None
    top = max(r["clip_t"] for r in rows)
    allowed = [r for r in rows if r["clip_t"] >= top - margin]
    return max(allowed, key=lambda r: (r["dino"], -r["epoch"]))


def _finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def nearest_checkpoint(run, step):
    """(path, its step) of the saved LoRA nearest to `step`: checkpoints/step_N/ or the final lora.safetensors
    (at the last logged step); the earlier one wins a tie. None when the run has none."""
    run = Path(run)
    found = []
    for d in (run / "checkpoints").glob("step_*"):
        if d.is_dir() and d.name[5:].isdigit():
            found.append((int(d.name[5:]), d))
    if (run / "lora.safetensors").is_file():
        steps = [r["step"] for r in read_jsonl(run / "log.jsonl") if isinstance(r.get("step"), int)]
        if steps:
            found.append((max(steps), run / "lora.safetensors"))
    if not found:
        return None
    s, path = min(found, key=lambda f: (abs(f[0] - step), f[0]))
    return path, s


# ---------------------------------------------------------------------------------------------------
# Image preprocessing (in torch: torchvision is not needed)

@dataclass(frozen=True)
class ImageSpec:
    """How a model wants its pixels: short side resized to `resize`, centre `crop`, then (x - mean) / std."""
    resize: int
    crop: int
    mean: tuple
    std: tuple


def _edge(value):
    """A size in a preprocessor config: an int, or {"shortest_edge": s} / {"height": h, "width": w}."""
    if isinstance(value, dict):
        value = value.get("shortest_edge") or min(value.get("height", 0), value.get("width", 0)) or None
    return int(value) if isinstance(value, (int, float)) else None


def image_spec(preprocessor, image_size, default_mean, default_std):
    """The ImageSpec from a preprocessor_config.json dict (or None) and the model's input size, which
    is always the crop (the position embeddings fix it)."""
    pre = preprocessor or {}
    resize = _edge(pre.get("size")) or image_size
    return ImageSpec(max(resize, image_size), image_size, tuple(pre.get("image_mean", default_mean)),
                     tuple(pre.get("image_std", default_std)))


def pil_to_tensor(image):
    """PIL image (any mode) -> [3, H, W] float32 in [0, 1]."""
    image = to_rgb(image)
    x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return x.view(image.height, image.width, 3).permute(2, 0, 1).float() / 255.0


def preprocess(images, spec):
    """PIL images -> [B, 3, crop, crop] fp32: bicubic antialiased resize of the short side, centre crop,
    normalisation (as CLIP's and ViT's own processors do, up to resampling details)."""
    out = []
    for image in images:
        x = pil_to_tensor(image)[None]
        h, w = x.shape[-2:]
        scale = spec.resize / min(h, w)
        size = (max(spec.crop, round(h * scale)), max(spec.crop, round(w * scale)))
        if size != (h, w):
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        top, left = (size[0] - spec.crop) // 2, (size[1] - spec.crop) // 2
        out.append(x[..., top:top + spec.crop, left:left + spec.crop])
    x = torch.cat(out)
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean) / std


def read_images(folder, what="images"):
    """The images directly in `folder` (sorted by name, EXIF rotation applied) as RGB PIL images."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{what} folder {folder} does not exist")
    paths = find_images(folder)
    if not paths:
        raise UserError(f"{what} folder {folder} holds no images (jpg, png, webp, bmp, tiff)")
    images = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im.load()
                images.append(to_rgb(ImageOps.exif_transpose(im)))
        except OSError as e:
            raise UserError(f"cannot read image {p}: {e}") from None
    return images


# ---------------------------------------------------------------------------------------------------
# Evaluator models

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
    dino_size = (_edge((dino_pre or {}).get("crop_size")) or 224) if dino_cfg.model_type == "dinov2" else dino_cfg.image_size
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


# ---------------------------------------------------------------------------------------------------
# A training run's folder

def _numbered_pngs(folder, prefix=""):
    """folder/{prefix}0.png, {prefix}1.png, ... in numeric order."""
    found = [(int(p.stem[len(prefix):]), p) for p in folder.glob(f"{prefix}*.png")
             if p.stem[len(prefix):].isdigit()]
    return [p for _, p in sorted(found)]


def sample_epochs(run):
    """[(epoch, folder)] of RUN/samples/epoch_NNNN/ folders holding validation images, by epoch."""
    found = []
    for d in (Path(run) / "samples").glob("epoch_*"):
        if d.is_dir() and d.name[6:].isdigit() and _numbered_pngs(d):
            found.append((int(d.name[6:]), d))
    return sorted(found)


def epoch_step(log_records, epoch):
    """The optimizer step at which epoch `epoch` ended: the last logged step whose epoch is <= it (0 before any)."""
    steps = [r["step"] for r in log_records
             if _finite(r.get("epoch")) and isinstance(r.get("step"), int) and r["epoch"] <= epoch + 1e-6]
    return max(steps, default=0)


def read_run(run, real=None):
    """(config.json dict, real images folder, validation prompt, class prompt) of a run folder."""
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"run folder {run} does not exist")
    try:
        config = json.loads((run / "config.json").read_text(encoding="utf-8"))
        resolved, given = config["resolved"], config["config"]
        prompt = resolved.get("validation_prompt") or given["validation_prompt"].format(
            prompt=resolved["prompt"], class_noun=given.get("class_noun", ""))
    except FileNotFoundError:
        raise UserError(f"{run} has no config.json: is it a train.py run folder?") from None
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, IndexError, ValueError) as e:
        raise UserError(f"{run / 'config.json'} is not a train.py run config ({type(e).__name__}: {e})") from None
    real = Path(real) if real else Path(given.get("images") or "")
    if not str(real) or not real.is_dir():
        raise UserError(f"the run's photos {str(real)!r} (config.json 'images') are not there: pass --real DIR")
    return config, real, prompt, resolved.get("class_prompt")


def check_run(run, real=None):
    """(real photos as PIL images, validation prompt, class prompt, [(epoch, folder)]) of a run folder,
    or a UserError: called before the evaluators are loaded, so that bad input fails fast."""
    _, real_dir, prompt, class_prompt = read_run(run, real)
    epochs = sample_epochs(run)
    if not epochs:
        raise UserError(f"{Path(run) / 'samples'} has no epoch_NNNN/ folders of validation images "
                        f"(0.png, 1.png, ...): train with --validate-every N")
    return read_images(real_dir, "real images"), prompt, class_prompt, epochs


def evaluate_run(run, evaluators, real=None, margin=CLIP_T_MARGIN):
    """Score every validation epoch of a run; write RUN/metrics.jsonl and RUN/metrics.png.

    Returns (records, best record or None, (checkpoint path, step) or None).
    """
    run = Path(run)
    real_images, prompt, class_prompt, epochs = check_run(run, real)
    log_records = read_jsonl(run / "log.jsonl")
    real_emb = embed_real(evaluators, real_images)
    records = []
    for epoch, folder in tqdm(epochs, desc="epochs", unit="epoch", disable=not evaluators.progress):
        class_paths = _numbered_pngs(folder, "class_") if class_prompt else []
        scores = evaluate_epoch(evaluators, real_emb, _open_all(_numbered_pngs(folder)), prompt,
                                _open_all(class_paths) or None)
        records.append({"epoch": epoch, "step": epoch_step(log_records, epoch),
                        **{k: round(scores[k], 6) for k in METRICS if k in scores}})
    write_jsonl_atomic(run / "metrics.jsonl", records)
    best = best_epoch(records, margin)
    plot_metrics(records, log_records, run / "metrics.png", best, margin)
    return records, best, nearest_checkpoint(run, best["step"]) if best else None


def _open_all(paths):
    images = []
    for p in paths:
        try:
            with Image.open(p) as im:
                images.append(to_rgb(im))
        except OSError as e:
            raise UserError(f"cannot read image {p}: {e}") from None
    return images


def write_jsonl_atomic(path, records):
    with atomic_path(path) as tmp:
        Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


# ---------------------------------------------------------------------------------------------------
# metrics.png: the metrics over epochs above the training loss, on one epoch axis (pillow only)

COLOURS = {"dino": (30, 90, 200), "clip_i": (40, 160, 70), "clip_t": (210, 50, 40), "pres": (230, 140, 0),
           "div": (140, 60, 170), "dino_nn": (120, 120, 120)}


def _panel(draw, box, x_range, series, y_label, fmt="{:.3f}"):
    """Line plots of {name: ([x], [y], colour)} in box = (left, top, right, bottom); returns the x mapping."""
    left, top, right, bottom = box
    draw.rectangle(box, outline="black")
    x0, x1 = x_range
    values = [v for xs, ys, _ in series.values() for v in ys]
    y0, y1 = (min(values), max(values)) if values else (0.0, 1.0)
    pad = max(y1 - y0, 1e-3) * 0.08
    y0, y1 = y0 - pad, y1 + pad
    fx = lambda x: left + (x - x0) / max(x1 - x0, 1e-9) * (right - left)
    fy = lambda y: bottom - (y - y0) / (y1 - y0) * (bottom - top)
    for name, (xs, ys, colour) in series.items():
        pts = [(fx(x), fy(y)) for x, y in zip(xs, ys)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        for px, py in pts if len(pts) < 60 and not name.startswith("_") else ():  # "_name": a guide line
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
    if values:
        draw.text((5, top), fmt.format(y1), fill="black")
        draw.text((5, bottom - 10), fmt.format(y0), fill="black")
    draw.text((5, (top + bottom) // 2 - 5), y_label, fill="black")
    return fx


def _dashed(draw, x, top, bottom):
    for y in range(int(top), int(bottom), 8):
        draw.line([(x, y), (x, min(y + 4, bottom))], fill="black")


def plot_metrics(records, log_records, path, best=None, margin=CLIP_T_MARGIN, size=(900, 820)):
    """Three panels on one epoch axis: the image metrics (DINO, CLIP-I, and PRES, DIV, DINO-NN when
    present), CLIP-T alone (its scale is ten times finer) with the best-epoch margin below its maximum,
    and the training loss per step (grey) with its moving average. The best epoch is marked."""
    w, h = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    losses = [(r["epoch"], r["loss"]) for r in log_records if _finite(r.get("epoch")) and _finite(r.get("loss"))]
    xs = [r["epoch"] for r in records] + [e for e, _ in losses]
    x_range = (min(xs, default=0), max(xs, default=1))
    series = {k: ([r["epoch"] for r in records if _finite(r.get(k))], [r[k] for r in records if _finite(r.get(k))],
                  COLOURS[k]) for k in METRICS if any(_finite(r.get(k)) for r in records)}
    left, right = 70, w - 20
    boxes = [(left, 40, right, 360), (left, 400, right, 560), (left, 600, right, h - 40)]
    image_series = {k: v for k, v in series.items() if k != "clip_t"}
    fx = _panel(draw, boxes[0], x_range, image_series, "cosine")
    x = left
    for k in image_series:
        name = k.replace("_", "-").upper()
        draw.text((x, 12), name, fill=COLOURS[k])
        x += 8 * len(name) + 24
    clip_t = {}
    if "clip_t" in series:  # the band the best-epoch rule allows, as two flat lines under the curve
        top_t = max(series["clip_t"][1])
        for name, y in (("_max", top_t), ("_margin", top_t - margin)):
            clip_t[name] = ([x_range[0], x_range[1]], [y, y], (240, 180, 180))
        clip_t["clip_t"] = series["clip_t"]
    _panel(draw, boxes[1], x_range, clip_t, "CLIP-T")
    draw.text((left, 380), f"CLIP-T (red) and the band within {margin} of its maximum", fill=COLOURS["clip_t"])
    if best is not None:
        bx = fx(best["epoch"])
        for box in boxes[:2]:
            _dashed(draw, bx, box[1], box[3])
        draw.text((min(bx + 4, right - 150), 44), f"best: epoch {best['epoch']}", fill="black")
    ema, smooth = None, []
    for _, v in losses:
        ema = v if ema is None else 0.9 * ema + 0.1 * v
        smooth.append(ema)
    loss_series = {"raw": ([e for e, _ in losses], [v for _, v in losses], (190, 190, 190)),
                   "ema": ([e for e, _ in losses], smooth, (30, 30, 30))}
    _panel(draw, boxes[2], x_range, loss_series if losses else {}, "loss", "{:.4f}")
    draw.text((left, h - 30), f"epoch {x_range[0]:g}", fill="black")
    draw.text((right - 90, h - 30), f"epoch {x_range[1]:g}", fill="black")
    draw.text((left, 580), "training loss (grey) and its moving average (black)"
              if losses else "no training loss logged", fill="black")
    save_png(img, path)
