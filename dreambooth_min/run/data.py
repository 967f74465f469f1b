"""Instance images -> tensors in [-1, 1] -> cached VAE latents (and the photos' masks).

DreamBooth fine-tunes on 3-10 photos of one subject, so we decode and encode them once: the VAE
posterior N(mean, std^2) of each image (and of its mirror image, for random flips) is stored, and
every step draws a fresh latent z = (mean + std * eps) * scaling_factor, as LDM's training does.
A photo's mask (`name.mask.png`, or --masks DIR) is cut and resized with its photo, and weights the loss
on the latent grid (dreambooth.dreambooth_loss).
"""
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from ..conditioning import size_time_ids
from ..errors import UserError
from ..formats.images import IMAGE_EXTS, MASK_SUFFIX, find_images, to_rgb
from .buckets import bucket_for


def load_image(path, resolution, size=None):
    """(image [3, H, W] float in [-1, 1], warning or None), (H, W) = `size` (an aspect bucket), default (R, R).

    EXIF orientation is applied (phones store rotated pixels plus a flag), the photo is resized with
    Lanczos (antialiased when shrinking) to cover H x W and the centre is kept. Resizing straight from the
    crop box of the original does both in one resampling step.
    """
    with Image.open(path) as im:
        im.load()
        img = to_rgb(ImageOps.exif_transpose(im))
    w, h = img.size
    th, tw = size or (resolution, resolution)
    box = crop_box(w, h, tw, th)
    img = img.resize((tw, th), Image.Resampling.LANCZOS, box=box)
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(th, tw, 3)
    x = x.permute(2, 0, 1).float() / 127.5 - 1.0  # [0, 255] -> [-1, 1], the VAE's input range
    warning = None
    if box[2] - box[0] < tw:
        crop = f"{round(box[2] - box[0])}x{round(box[3] - box[1])}"  # a long thin photo: only one side is short
        warning = f"{Path(path).name} is {w}x{h}; its {crop} crop is smaller than {tw}x{th}: upscaled, may look soft"
    return x, warning


def crop_box(w, h, tw, th):
    """The centred box of a w x h image with the aspect ratio of tw x th (the square of the short side for a
    square target), as (left, top, right, bottom) in pixels of the image."""
    cw, ch = min(w, h * tw / th), min(h, w * th / tw)
    return (w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2


def original_size(path):
    """(height, width) of the photo as it stands upright (EXIF orientation applied), from its header alone."""
    with Image.open(path) as im:
        w, h = im.size
        if im.getexif().get(0x0112) in (5, 6, 7, 8):  # rotated by 90 degrees: the upright photo is h x w
            w, h = h, w
    return h, w


def photo_time_ids(sizes, resolution, targets=None):
    """SDXL's size conditioning (Podell et al. 2023, sec. 2.2) of photos of original `sizes` [(h, w)] trained at
    R x R, or each at its aspect bucket `targets` [(H, W)]: one row (h, w, crop top, crop left, H, W) each,
    [N, 6] float.

    As diffusers' train_dreambooth_lora_sdxl.py with --center_crop computes it: the photo is resized to cover
    H x W (torchvision's Resize: the other side becomes int(H * w / h) or int(W * h / w)), and the crop's
    top-left corner is round((resized - target) / 2) in the resized image."""
    rows = []
    for (h, w), (th, tw) in zip(sizes, targets or [(resolution, resolution)] * len(sizes)):
        rh, rw = (th, int(th * w / h)) if h * tw <= w * th else (int(tw * h / w), tw)
        crop = max(0, int(round((rh - th) / 2.0))), max(0, int(round((rw - tw) / 2.0)))
        rows.append(size_time_ids((h, w), crop, (th, tw)))
    return torch.stack(rows) if rows else torch.zeros(0, 6)


def caption_for(path, prompt):
    """`name.txt` beside `name.jpg` (stripped) if present and non-empty, else the instance prompt."""
    txt = Path(path).with_suffix(".txt")
    if txt.is_file():
        text = txt.read_text(encoding="utf-8", errors="replace").strip()
        if text:
            return text
    return prompt


def load_instance_images(folder, resolution, prompt, with_sizes=False):
    """(images [N, 3, R, R] in [-1, 1], captions [N], warnings [str]) from a folder of photos, and with
    `with_sizes` their original sizes [(h, w)] (SDXL's size conditioning, photo_time_ids)."""
    photos = load_photos(folder, resolution, prompt)
    return (torch.stack(photos.images), photos.captions, photos.warnings) + ((photos.sizes,) if with_sizes else ())


@dataclass
class Photos:
    """The subject's photos as training reads them."""
    images: list = field(default_factory=list)  # [3, H, W] in [-1, 1] each: R x R, or its bucket's size
    captions: list = field(default_factory=list)
    sizes: list = field(default_factory=list)  # (h, w) of each photo as it stands upright
    buckets: list = None  # --aspect-buckets: (H, W) of each; None: all R x R
    masks: list = None  # [1, H, W] in [0, 1] each, cut and resized as its photo; None: no masks
    warnings: list = field(default_factory=list)


def load_photos(folder, resolution, prompt, buckets=None, masks=None):
    """The Photos in `folder`: each centre-cropped to R x R, or with `buckets` (--aspect-buckets) resized whole
    into the bucket nearest its shape; with `masks` ({photo path: mask path}, check_masks) their masks.

    Unreadable files are skipped with a warning as long as one image is readable; otherwise, and
    for a missing / empty folder, a UserError says what is wrong in one line.
    """
    folder = Path(folder)
    if not folder.exists():
        raise UserError(f"instance image folder {folder} does not exist")
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder (pass the folder that holds the instance images)")
    paths = find_images(folder)
    if not paths:
        raise UserError(f"{folder} holds no images ({', '.join(IMAGE_EXTS)})")
    photos, failed = Photos(buckets=[] if buckets else None, masks=[] if masks else None), []
    for p in paths:
        try:
            size = original_size(p)
            target = bucket_for(size, buckets) if buckets else None
            x, warning = load_image(p, resolution, target)
        except Exception as e:  # any decoder failure (truncated, not an image, decompression bomb...)
            failed.append(f"{p.name} ({type(e).__name__}: {e})")
            continue
        photos.images.append(x)
        photos.sizes.append(size)
        photos.captions.append(caption_for(p, prompt))
        if buckets:
            photos.buckets.append(target)
        if masks:
            photos.masks.append(load_mask(masks[p], tuple(x.shape[-2:])))
        if warning:
            photos.warnings.append(warning)
    if not photos.images:
        raise UserError(f"none of the {len(paths)} images in {folder} could be read, e.g. {failed[0]}")
    photos.warnings += [f"skipped unreadable image {f}" for f in failed] + _ignored_files(folder)
    return photos


def _ignored_files(folder):
    others = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                    and p.suffix.lower() not in IMAGE_EXTS + (".txt", ".md"))  # captions; a README or attribution
    return [f"ignored {len(others)} files that are not {'/'.join(IMAGE_EXTS)} images, e.g. {others[0]}"] if others \
        else []


# ---------------------------------------------------------------------------------------------
# masks: grey levels weight the loss (white: learn this, black: ignore it)

def mask_paths(folder, mask_dir=""):
    """{photo: its mask} for the photos in `folder`, or {} when they have none: `name.mask.png` beside
    `name.jpg`, or with --masks DIR `DIR/name.mask.png` or `DIR/name.png`. Masks are all or none."""
    photos = find_images(folder)
    if not mask_dir:
        beside = {p: p.with_name(p.stem + MASK_SUFFIX) for p in photos}
        return beside if any(m.exists() for m in beside.values()) else {}
    folder = Path(mask_dir)
    if not folder.is_dir():
        raise UserError(f"--masks {folder} is not a folder (give the folder that holds name.mask.png or name.png "
                        "for each photo name.jpg)")
    return {p: next((m for m in (folder / (p.stem + MASK_SUFFIX), folder / f"{p.stem}.png") if m.exists()),
                    folder / (p.stem + MASK_SUFFIX)) for p in photos}


def check_masks(folder, mask_dir=""):
    """mask_paths, each mask checked (it exists, decodes, has its photo's size and is not black everywhere),
    before any slow work: a bad one is one UserError line that names it."""
    masks = mask_paths(folder, mask_dir)
    for photo, mask in masks.items():
        if not mask.exists():
            raise UserError(f"{photo.name} has no mask {mask}: when one photo has a mask, every photo needs one")
        try:
            h, w = original_size(photo)
        except Exception:
            continue  # an unreadable photo is skipped with a warning, and its mask with it
        try:
            image = read_mask(mask)
        except Exception as e:
            raise UserError(f"cannot read the mask {mask} ({type(e).__name__}: {e})") from None
        if image.size != (w, h):
            raise UserError(f"the mask {mask} is {image.size[0]}x{image.size[1]} but its photo {photo.name} is "
                            f"{w}x{h}: a mask has its photo's size")
        if image.getbbox() is None:
            raise UserError(f"the mask {mask} is black everywhere: nothing of {photo.name} would be learnt")
    return masks


def read_mask(path):
    """The mask at `path` as an 8-bit grey PIL image, upright (EXIF), transparent pixels white."""
    with Image.open(path) as im:
        im.load()
        return to_rgb(ImageOps.exif_transpose(im)).convert("L")


def load_mask(path, size):
    """The mask [1, H, W] in [0, 1] of a photo trained at `size` (H, W): cut with the photo's crop box and
    area-averaged (box filter), so that grey levels stay weights."""
    image = read_mask(path)
    th, tw = size
    image = image.resize((tw, th), Image.Resampling.BOX, box=crop_box(*image.size, tw, th))
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(1, th, tw).float() / 255.0


def latent_mask(mask, latent_size):
    """A mask [1, H, W] on the latent grid (h, w): the area average of each latent pixel's H/h x W/w pixels."""
    h, w = latent_size
    return F.avg_pool2d(mask[None], (mask.shape[-2] // h, mask.shape[-1] // w))[0]


# ---------------------------------------------------------------------------------------------
# latent cache

def epoch_order(n, seed, epoch):
    """The order of the n photos in `epoch`: a permutation from a generator of its own per epoch, so
    that any step's batch is known without replaying the run (resume)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


@torch.no_grad()
def encode_latents(vae, images, batch_size=4):
    """(mean, std) of the VAE posterior q(z|x) = N(mean, std^2) per image, fp32, on the VAE's device.

    std = exp(logvar / 2). Encoded once: the VAE is frozen during DreamBooth.
    """
    p = next(vae.parameters())
    means, stds = [], []
    for i in range(0, len(images), batch_size):
        mean, logvar = vae.encode(images[i:i + batch_size].to(p.device, p.dtype))
        means.append(mean.float())
        stds.append(torch.exp(0.5 * logvar.float()))
    return torch.cat(means), torch.cat(stds)


class LatentCache:
    """Posterior of each image and of its mirror image; sample() draws training latents.

    Flipping a cached latent is not the latent of the flipped image (the VAE is not mirror
    symmetric), so the mirror images are encoded too and one of the two is picked per step. Each
    (image, view) is encoded once, when first drawn: a short run encodes only what it uses, a long one
    everything, and the latents are the same either way (one image per encode).
    """

    def __init__(self, vae, images, flip=True, sizes=None, masks=None):
        self.vae, self.images, self.views = vae, images, 2 if flip else 1  # [N, 3, H, W], or a list of [3, H, W]
        self.scaling_factor = vae.scaling_factor
        self.posteriors = {}  # (image, view) -> (mean, std) [4, h, w]
        self.sizes = sizes  # SDXL: [N, 6] photo_time_ids of the images (a mirror image has its original's); else None
        self.masks = masks  # [1, H, W] in [0, 1] per image (a mirror image has its mask mirrored); else None

    def __len__(self):
        return len(self.images)

    def time_ids(self, index):
        """The size conditioning rows [len(index), 6] of images `index`, or None for a model without it."""
        return None if self.sizes is None else self.sizes[torch.as_tensor(index, dtype=torch.long)]

    def posterior(self, i, view):
        if (i, view) not in self.posteriors:
            image = self.images[i].unsqueeze(0)
            mean, std = encode_latents(self.vae, image.flip(-1) if view else image, batch_size=1)
            self.posteriors[i, view] = mean[0], std[0]
        return self.posteriors[i, view]

    @property
    def mean(self):
        """[N, views, 4, h, w], every image encoded."""
        return torch.stack([torch.stack([self.posterior(i, v)[0] for v in range(self.views)]) for i in range(len(self))])

    def sample(self, index, generator=None):
        """z = (mean + std * eps) * scaling_factor for images `index` (a LongTensor), random view each."""
        return self.draw(index, generator)[0]

    def draw(self, index, generator=None):
        """(z, m): sample()'s latents, and the images' masks on the latent grid [len(index), 1, h, w] (mirrored
        with a mirrored view), or None without masks."""
        index = torch.as_tensor(index, dtype=torch.long)
        gdev = generator.device if generator is not None else torch.device("cpu")
        view = torch.randint(self.views, (len(index),), generator=generator, device=gdev).cpu()
        pairs = [self.posterior(int(i), int(v)) for i, v in zip(index, view)]
        mean, std = torch.stack([m for m, _ in pairs]), torch.stack([s for _, s in pairs])
        eps = torch.randn(mean.shape, generator=generator, device=gdev).to(mean.device)
        masks = None if self.masks is None else torch.stack([
            latent_mask(self.masks[int(i)].flip(-1) if v else self.masks[int(i)], mean.shape[-2:])
            for i, v in zip(index, view)])
        return (mean + std * eps) * self.scaling_factor, masks
