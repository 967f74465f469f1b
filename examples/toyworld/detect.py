"""Pixel detectors that read a 32x32 sample: which colour its shape has, and whether it shows the subject.

Two detectors, both reported:

1. Nearest colour (the headline numbers fidelity / drift / red_kept). The shape (foreground, below) is
   reduced to its mean RGB and named after the nearest prototype: red, green, blue, yellow, or "subject".
   Prototypes are mean colours of calibration pictures passed through the model's own autoencoder, so
   they describe what the model *can* draw: the toy autoencoder renders the magenta/white stripes as a
   pink-peach disc with faint bands, which no world colour is near.
2. Pixel hue (stricter, *_magenta numbers). Every foreground pixel gets a colour name from its hue, or
   "white" when unsaturated and bright. `shows_subject`: magenta >= 20% and white >= 10% of the shape
   (both stripe colours); `subject_sign`: magenta >= 20%. Magenta is no colour of the world.

Foreground = pixels with max channel >= 90 (backgrounds are <= 60); fewer than 12 such pixels = no shape.
Shapes are not checked: the claims are about the subject's look leaking into its class, which is colour.
"""
import numpy as np

MIN_FOREGROUND = 12
NAMES = ("red", "yellow", "green", "blue", "magenta", "white", "other")
# Hue ranges in degrees [lo, hi) for saturated pixels; red wraps around 0.
HUES = (("red", 345, 360), ("red", 0, 20), ("yellow", 40, 75), ("green", 75, 170), ("blue", 190, 265),
        ("magenta", 270, 345))


def pixel_names(rgb):
    """Colour name index (into NAMES) for every pixel of an [..., 3] uint8 array; -1 = background."""
    x = rgb.astype(np.float32) / 255.0
    mx, mn = x.max(-1), x.min(-1)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    d = np.maximum(mx - mn, 1e-6)
    hue = np.where(mx == r, ((g - b) / d) % 6, np.where(mx == g, (b - r) / d + 2, (r - g) / d + 4)) * 60.0
    names = np.full(mx.shape, NAMES.index("other"), dtype=np.int64)
    for name, lo, hi in HUES:
        names[(hue >= lo) & (hue < hi) & (sat >= 0.35)] = NAMES.index(name)
    names[(sat < 0.25) & (mx >= 0.7)] = NAMES.index("white")
    names[mx < 90 / 255] = -1
    return names


def colour_shares(image):
    """{name: share of the foreground} and the foreground's pixel count, for one PIL image / uint8 array."""
    names = pixel_names(np.asarray(image, dtype=np.uint8)[..., :3])
    fg = names[names >= 0]
    if len(fg) < MIN_FOREGROUND:
        return {n: 0.0 for n in NAMES}, len(fg)
    counts = np.bincount(fg, minlength=len(NAMES))
    return {n: float(c) / len(fg) for n, c in zip(NAMES, counts)}, len(fg)


def colour(image):
    shares, n = colour_shares(image)
    return max(shares, key=shares.get) if n >= MIN_FOREGROUND else "none"


def shows_subject(image):
    shares, _ = colour_shares(image)
    return shares["magenta"] >= 0.2 and shares["white"] >= 0.1


def subject_sign(image):
    return colour_shares(image)[0]["magenta"] >= 0.2


def rate(flags):
    flags = list(flags)
    return sum(map(bool, flags)) / max(1, len(flags))


def detector_accuracy(world_images, world_colours, subject_images):
    """How the detectors do on rendered pictures (not samples): colour right, subject found, no false alarms."""
    return {
        "colour_correct": rate(colour(im) == c for im, c in zip(world_images, world_colours)),
        "subject_found": rate(shows_subject(im) for im in subject_images),
        "subject_sign_found": rate(subject_sign(im) for im in subject_images),
        "subject_false_alarm": rate(shows_subject(im) for im in world_images),
        "subject_sign_false_alarm": rate(subject_sign(im) for im in world_images),
        "n_world": len(world_images), "n_subject": len(subject_images),
    }


# ---------------------------------------------------------------------------------------------------
# Nearest-colour detector, calibrated on pictures as the model's autoencoder draws them. The toy
# autoencoder cannot reproduce every pixel of the subject (its stripes come out as a pink-peach disc with
# faint bands), so a sample is judged by the mean colour of its shape: the nearest of the four world
# colours and the subject's, each the mean over calibration pictures passed through the same autoencoder.

def mean_colour(image):
    """Mean RGB of the foreground (the shape), or None when there is no shape."""
    a = np.asarray(image, dtype=np.uint8)[..., :3]
    fg = pixel_names(a) >= 0
    return a[fg].astype(np.float64).mean(0) if fg.sum() >= MIN_FOREGROUND else None


def calibrate(world_images, world_colours, subject_images):
    """{name: mean RGB}: the prototype of each world colour and of "subject"."""
    groups = {}
    for im, name in list(zip(world_images, world_colours)) + [(im, "subject") for im in subject_images]:
        c = mean_colour(im)
        if c is not None:
            groups.setdefault(name, []).append(c)
    return {name: np.mean(cs, 0).tolist() for name, cs in groups.items()}


def nearest(image, prototypes, margin=0.0):
    """Name of the prototype nearest to the shape's mean colour ("none" without a shape). "subject" only
    when it is nearer than the nearest world colour by `margin` (RGB distance); else that world colour.
    The margin keeps blends of two world colours (orange, pink, purple: the pretrained model draws them
    for "a circle", which names no colour) from counting as the subject's pink-peach."""
    c = mean_colour(image)
    if c is None:
        return "none"
    dist = {n: float(np.sqrt(((c - np.asarray(p)) ** 2).sum())) for n, p in prototypes.items()}
    best = min(dist, key=dist.get)
    if best != "subject" or margin <= 0:
        return best
    world_best = min((n for n in dist if n != "subject"), key=dist.get)
    return best if dist[best] + margin < dist[world_best] else world_best


def nearest_accuracy(world_images, world_colours, subject_images, prototypes, margin=0.0):
    """Accuracy of `nearest` on pictures it was not calibrated on."""
    name = lambda im: nearest(im, prototypes, margin)
    return {"colour_correct": rate(name(im) == c for im, c in zip(world_images, world_colours)),
            "subject_found": rate(name(im) == "subject" for im in subject_images),
            "subject_false_alarm": rate(name(im) == "subject" for im in world_images)}
