"""Instance images -> tensors in [-1, 1] -> cached VAE latents.

DreamBooth fine-tunes on 3-10 photos of one subject, so we decode and encode them once: the VAE
posterior N(mean, std^2) of each image (and of its mirror image, for random flips) is stored, and
every step draws a fresh latent z = (mean + std * eps) * scaling_factor, as LDM's training does.
"""
from pathlib import Path

import torch
from PIL import Image, ImageOps

from ..conditioning import size_time_ids
from ..errors import UserError
from ..formats.images import IMAGE_EXTS, find_images, to_rgb


def load_image(path, resolution):
    """(image [3, R, R] float in [-1, 1], warning or None).

    EXIF orientation is applied (phones store rotated pixels plus a flag), the short side is resized
    to R with Lanczos (antialiased when shrinking) and the centre square is kept. Resizing straight
    from the crop box of the original does both in one resampling step.
    """
    with Image.open(path) as im:
        im.load()
        img = to_rgb(ImageOps.exif_transpose(im))
    w, h = img.size
    s = min(w, h)
    box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
    img = img.resize((resolution, resolution), Image.Resampling.LANCZOS, box=box)
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(resolution, resolution, 3)
    x = x.permute(2, 0, 1).float() / 127.5 - 1.0  # [0, 255] -> [-1, 1], the VAE's input range
    warning = None
    if s < resolution:
        warning = f"{Path(path).name} is {w}x{h}, smaller than {resolution}x{resolution}: upscaled, may look soft"
    return x, warning


def original_size(path):
    """(height, width) of the photo as it stands upright (EXIF orientation applied), from its header alone."""
    with Image.open(path) as im:
        w, h = im.size
        if im.getexif().get(0x0112) in (5, 6, 7, 8):  # rotated by 90 degrees: the upright photo is h x w
            w, h = h, w
    return h, w


def photo_time_ids(sizes, resolution):
    """SDXL's size conditioning (Podell et al. 2023, sec. 2.2) of photos of original `sizes` [(h, w)] trained at
    R x R: one row (h, w, crop top, crop left, R, R) each, [N, 6] float.

    As diffusers' train_dreambooth_lora_sdxl.py with --center_crop computes it: the short side is resized to R
    (torchvision's Resize: the long side becomes int(R * long / short)), and the crop's top-left corner is
    round((resized - R) / 2) in the resized image."""
    rows = []
    for h, w in sizes:
        rh, rw = (resolution, int(resolution * w / h)) if h <= w else (int(resolution * h / w), resolution)
        crop = max(0, int(round((rh - resolution) / 2.0))), max(0, int(round((rw - resolution) / 2.0)))
        rows.append(size_time_ids((h, w), crop, (resolution, resolution)))
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
    `with_sizes` their original sizes [(h, w)] (SDXL's size conditioning, photo_time_ids).

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
    images, captions, warnings, failed, sizes = [], [], [], [], []
    for p in paths:
        try:
            x, warning = load_image(p, resolution)
        except Exception as e:  # any decoder failure (truncated, not an image, decompression bomb...)
            failed.append(f"{p.name} ({type(e).__name__}: {e})")
            continue
        images.append(x)
        sizes.append(original_size(p))
        captions.append(caption_for(p, prompt))
        if warning:
            warnings.append(warning)
    if not images:
        raise UserError(f"none of the {len(paths)} images in {folder} could be read, e.g. {failed[0]}")
    warnings += [f"skipped unreadable image {f}" for f in failed]
    others = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                    and p.suffix.lower() not in IMAGE_EXTS + (".txt", ".md"))  # captions; a README or attribution
    if others:
        warnings.append(f"ignored {len(others)} files that are not {'/'.join(IMAGE_EXTS)} images, e.g. {others[0]}")
    return (torch.stack(images), captions, warnings) + ((sizes,) if with_sizes else ())


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

    def __init__(self, vae, images, flip=True, sizes=None):
        self.vae, self.images, self.views = vae, images, 2 if flip else 1
        self.scaling_factor = vae.scaling_factor
        self.posteriors = {}  # (image, view) -> (mean, std) [4, h, w]
        self.sizes = sizes  # SDXL: [N, 6] photo_time_ids of the images (a mirror image has its original's); else None

    def __len__(self):
        return len(self.images)

    def time_ids(self, index):
        """The size conditioning rows [len(index), 6] of images `index`, or None for a model without it."""
        return None if self.sizes is None else self.sizes[torch.as_tensor(index, dtype=torch.long)]

    def posterior(self, i, view):
        if (i, view) not in self.posteriors:
            image = self.images[i:i + 1]
            mean, std = encode_latents(self.vae, image.flip(-1) if view else image, batch_size=1)
            self.posteriors[i, view] = mean[0], std[0]
        return self.posteriors[i, view]

    @property
    def mean(self):
        """[N, views, 4, h, w], every image encoded."""
        return torch.stack([torch.stack([self.posterior(i, v)[0] for v in range(self.views)]) for i in range(len(self))])

    def sample(self, index, generator=None):
        """z = (mean + std * eps) * scaling_factor for images `index` (a LongTensor), random view each."""
        index = torch.as_tensor(index, dtype=torch.long)
        gdev = generator.device if generator is not None else torch.device("cpu")
        view = torch.randint(self.views, (len(index),), generator=generator, device=gdev).cpu()
        pairs = [self.posterior(int(i), int(v)) for i, v in zip(index, view)]
        mean, std = torch.stack([m for m, _ in pairs]), torch.stack([s for _, s in pairs])
        eps = torch.randn(mean.shape, generator=generator, device=gdev).to(mean.device)
        return (mean + std * eps) * self.scaling_factor
