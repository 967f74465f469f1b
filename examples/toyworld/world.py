"""The toy world: 32x32 pictures of one flat-coloured shape on a dark background (the detectors: detect.py).

Everything is drawn from `random.Random(seed)`, whose stream Python guarantees for a given seed, so a seed
gives the same pictures on every machine. Shapes are drawn at 4x the size and downsampled (anti-aliased).

The DreamBooth subject is a cyan circle with thin white stripes. Cyan lies outside the convex hull of the
world's four colours (its red channel is below every world colour's), so no blend of world colours, which an
imperfect model draws for prompts that name no colour, comes near it: whatever of it appears in a "circle"
sample came from the fine-tuning. (White is outside the hull too, but the toy autoencoder draws it inside:
subject_fill; the subject is read by its cyan.) For the masked cases the same subject
stands on purple checks (BUSY), with a mask per picture.
"""
import random

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32
SUPER = 4  # supersampling factor of the renderer
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 35, 35), "green": (40, 190, 50), "blue": (45, 80, 230), "yellow": (225, 205, 35)}
CYAN, WHITE = (15, 215, 225), (240, 240, 240)
SUBJECT_PERIOD, SUBJECT_LINE = 12, 2  # a white line 2 pixels wide every 12 pixels, cyan between
BUSY_MAX = 70  # brightest channel of the autoencoder's random busy backgrounds (detect.FOREGROUND is 90)
BUSY = ((80, 10, 80), (45, 0, 55))  # the masked case's background: purple checks, 4-pixel squares, <= 88
# The loss mask acts on the latent grid (one latent per 4x4 pixels here, 8x8 in SD): a latent on the subject's
# outline carries background too, so the mask stays one latent inside it (measured in docs/toyworld.md).
MASK_INSET = 4


def caption(colour, shape, rng):
    """ "a photo of a {colour} {shape}" (70%), "a photo of a {shape}" (20%), "" (10%, for guidance)."""
    u = rng.random()
    if u < 0.7:
        return f"a photo of a {colour} {shape}"
    return f"a photo of a {shape}" if u < 0.9 else ""


def _geometry(rng):
    """Centre and radius (in output pixels) of a shape: it stays whole inside the picture."""
    r = rng.uniform(7.0, 11.0)
    cx, cy = (SIZE / 2 + rng.uniform(-3.0, 3.0) for _ in range(2))
    return cx, cy, r


def _polygon(shape, cx, cy, r):
    """Outline in supersampled pixels; None for a circle (drawn as an ellipse)."""
    s = SUPER
    if shape == "square":
        h = r * 0.85
        return [((cx - h) * s, (cy - h) * s), ((cx + h) * s, (cy - h) * s),
                ((cx + h) * s, (cy + h) * s), ((cx - h) * s, (cy + h) * s)]
    if shape == "triangle":
        return [(cx * s, (cy - r) * s), ((cx + 0.93 * r) * s, (cy + 0.62 * r) * s),
                ((cx - 0.93 * r) * s, (cy + 0.62 * r) * s)]
    return None


def shape_mask(shape, cx, cy, r):
    """Supersampled 'L' mask of the shape."""
    mask = Image.new("L", (SIZE * SUPER, SIZE * SUPER), 0)
    draw = ImageDraw.Draw(mask)
    poly = _polygon(shape, cx, cy, r)
    if poly is None:
        draw.ellipse([(cx - r) * SUPER, (cy - r) * SUPER, (cx + r) * SUPER, (cy + r) * SUPER], fill=255)
    else:
        draw.polygon(poly, fill=255)
    return mask


def pattern(kind, colour_a, colour_b, period, angle=0):
    """Supersampled RGB fill: 'plain' (colour_a), 'stripes' at `angle` degrees, or 'checks'."""
    n = SIZE * SUPER
    if kind == "plain":
        return Image.new("RGB", (n, n), colour_a)
    y, x = np.mgrid[0:n, 0:n] / SUPER
    if kind == "stripes":
        t = np.deg2rad(angle)
        u = x * np.sin(t) + y * np.cos(t)
        first = (u % period) < period / 2
    else:
        first = ((x // (period / 2)) + (y // (period / 2))) % 2 == 0
    rgb = np.where(first[..., None], np.array(colour_a), np.array(colour_b)).astype(np.uint8)
    return Image.fromarray(rgb)


def render(shape, fill, geometry, background):
    """One 32x32 RGB picture: `fill` (supersampled image) inside the shape; outside, a grey level
    `background`, or a supersampled image (a busy background)."""
    n = SIZE * SUPER
    canvas = background.copy() if isinstance(background, Image.Image) else Image.new("RGB", (n, n), (background,) * 3)
    canvas.paste(fill, (0, 0), shape_mask(shape, *geometry))
    return canvas.resize((SIZE, SIZE), Image.Resampling.BOX)


def busy_background(rng):
    """A dark two-colour pattern (stripes or checks, every channel <= BUSY_MAX): busy, but never brighter
    than the shapes' foreground threshold (detect.FOREGROUND = 90)."""
    a, b = (tuple(rng.randint(0, BUSY_MAX) for _ in range(3)) for _ in range(2))
    kind = rng.choice(("stripes", "checks"))
    return pattern(kind, a, b, rng.uniform(4.0, 10.0), angle=rng.choice((0, 45, 90, 135)))


def _jitter(colour, rng, amount=15):
    return tuple(int(min(255, max(0, c + rng.randint(-amount, amount)))) for c in colour)


def world_sample(rng, shape=None, colour=None):
    """(image, caption, colour, shape) of the world; shape / colour random unless given."""
    shape = shape or rng.choice(SHAPES)
    colour = colour or rng.choice(list(COLOURS))
    fill = pattern("plain", _jitter(COLOURS[colour], rng), None, 0)
    image = render(shape, fill, _geometry(rng), rng.randint(5, 35))
    return image, caption(colour, shape, rng), colour, shape


def make_world(n, seed):
    """(images [n] PIL, captions [n], colours [n], shapes [n]): the pretraining set."""
    rng = random.Random(seed)
    rows = [world_sample(rng) for _ in range(n)]
    return tuple(list(col) for col in zip(*rows))


def subject_image(rng):
    """The subject: a cyan circle with thin horizontal white stripes (never seen in pretraining)."""
    return render("circle", subject_fill(rng), _geometry(rng), rng.randint(5, 35))


def subject_fill(rng):
    """Cyan with a 2-pixel white line every SUBJECT_PERIOD pixels. Mostly cyan: the toy autoencoder draws
    white as a yellowish grey (measured: white 230 -> (201, 190, 80)), inside the world's colours."""
    n = SIZE * SUPER
    y = np.mgrid[0:n, 0:n][0] / SUPER
    line = (y % SUBJECT_PERIOD) < SUBJECT_LINE
    rgb = np.where(line[..., None], np.array(_jitter(WHITE, rng, 8)), np.array(_jitter(CYAN, rng, 8)))
    return Image.fromarray(rgb.astype(np.uint8))


def make_subject(n, seed):
    rng = random.Random(seed * 7919 + 1)
    return [subject_image(rng) for _ in range(n)]


def subject_on_busy(rng):
    """(picture, mask): the subject on the masked case's busy background (BUSY checks), and its mask: white
    on the circle shrunk by MASK_INSET pixels, black elsewhere, anti-aliased like the picture."""
    cx, cy, r = geometry = _geometry(rng)
    checks = pattern("checks", _jitter(BUSY[0], rng, 8), _jitter(BUSY[1], rng, 8), 8.0)
    mask = shape_mask("circle", cx, cy, r - MASK_INSET).resize((SIZE, SIZE), Image.Resampling.BOX)
    return render("circle", subject_fill(rng), geometry, checks), mask


def make_subject_on_busy(n, seed):
    """[(picture, mask)] * n: the same seed as make_subject draws other pictures (its own stream)."""
    rng = random.Random(seed * 7919 + 3)
    return [subject_on_busy(rng) for _ in range(n)]


def texture_image(rng):
    """Any shape, any two colours, stripes / checks / plain, on grey or on a busy dark background: teaches
    the autoencoder textures and colours the world lacks (a real SD autoencoder can draw anything; only the
    denoiser's world is small)."""
    a, b = (tuple(rng.randint(0, 255) for _ in range(3)) for _ in range(2))
    kind = rng.choice(("stripes", "stripes", "checks", "plain"))
    fill = pattern(kind, a, b, rng.uniform(4.0, 12.0), angle=rng.choice((0, 45, 90, 135)))
    background = busy_background(rng) if rng.random() < 0.7 else rng.randint(0, 60)
    return render(rng.choice(SHAPES), fill, _geometry(rng), background)


def make_textures(n, seed):
    rng = random.Random(seed * 104729 + 2)
    return [texture_image(rng) for _ in range(n)]


def to_tensor(images):
    """PIL images -> float tensor [N, 3, 32, 32] in [-1, 1] (the autoencoder's range)."""
    import torch

    a = np.stack([np.asarray(im, dtype=np.uint8) for im in images])
    return torch.from_numpy(a).permute(0, 3, 1, 2).float() / 127.5 - 1.0
