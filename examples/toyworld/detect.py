"""The instrument: reads a 32x32 sample and names its shape's colour (a world colour, or "subject").

Calibration (`calibrate`), fixed before any DreamBooth run: held-out world pictures and subject pictures,
passed through the toy model's own autoencoder (what the model *can* draw), give one prototype each: the
mean RGB of the shapes of each world colour, and of the subject's. Nothing else is calibrated or tuned:
a sample is named after the nearest prototype, with no margin and no threshold.

Two readings of the same prototypes, both reported:
1. `nearest` (the headline numbers): the shape's mean RGB, named after the nearest prototype.
2. `pixel_vote` (the *_pixels numbers): every pixel of the shape named after its nearest prototype; the
   shape gets the name most of its pixels have. It sees stripes the mean blurs, and a half-and-half blend.

The subject (cyan and white stripes) lies outside the convex hull of the world's colours: a blend of world
colours, which the pretrained model draws for "a circle" (a prompt that names no colour), stays nearer a
world colour. `floor` in results.json is how often the untouched model is read as the subject anyway.

Foreground = pixels with a channel >= 90 (FOREGROUND): the renderer's backgrounds are <= 35 and every
shape colour has a channel >= 175, so this is a property of the world, not a tuned number. Fewer than
12 such pixels = no shape ("none"); a 32x32 picture's smallest shape has about 100.
"""
import numpy as np

FOREGROUND = 90
MIN_FOREGROUND = 12


def _pixels(image):
    return np.asarray(image, dtype=np.uint8)[..., :3]


def foreground(image):
    """[N, 3] float RGB of the shape's pixels (the foreground), or None when there is no shape."""
    a = _pixels(image)
    fg = a.max(-1) >= FOREGROUND
    return a[fg].astype(np.float64) if fg.sum() >= MIN_FOREGROUND else None


def mean_colour(image):
    """Mean RGB of the shape, or None when there is no shape."""
    fg = foreground(image)
    return None if fg is None else fg.mean(0)


def calibrate(world_images, world_colours, subject_images):
    """{name: mean RGB}: the prototype of each world colour and of "subject" (the mean of its shapes' mean
    colours). The only parameters of the detector."""
    groups = {}
    for im, name in list(zip(world_images, world_colours)) + [(im, "subject") for im in subject_images]:
        c = mean_colour(im)
        if c is not None:
            groups.setdefault(name, []).append(c)
    return {name: np.mean(cs, 0).tolist() for name, cs in groups.items()}


def _nearest_index(colours, prototypes):
    """Index into `prototypes` (names, [K, 3]) of the nearest prototype for each row of `colours` [N, 3]."""
    names, table = prototypes
    return np.argmin(((colours[:, None, :] - table[None]) ** 2).sum(-1), axis=1)


def _table(prototypes):
    names = sorted(prototypes)
    return names, np.array([prototypes[n] for n in names], dtype=np.float64)


def nearest(image, prototypes):
    """Name of the prototype nearest to the shape's mean colour; "none" without a shape."""
    c = mean_colour(image)
    if c is None:
        return "none"
    names, table = _table(prototypes)
    return names[int(_nearest_index(c[None], (names, table))[0])]


def pixel_vote(image, prototypes):
    """Name most of the shape's pixels have, each pixel named after its nearest prototype; "none" without one."""
    fg = foreground(image)
    if fg is None:
        return "none"
    names, table = _table(prototypes)
    votes = np.bincount(_nearest_index(fg, (names, table)), minlength=len(names))
    return names[int(votes.argmax())]


def rate(flags):
    flags = list(flags)
    return sum(map(bool, flags)) / max(1, len(flags))


def accuracy(world_images, world_colours, subject_images, prototypes):
    """Both readings on pictures the prototypes were not made from: world colour right, subject found,
    subject named where there is none (false alarm)."""
    out = {}
    for reading, read in (("nearest", nearest), ("pixel_vote", pixel_vote)):
        name = lambda im: read(im, prototypes)
        world_names = [name(im) for im in world_images]
        out[reading] = {"colour_correct": rate(n == c for n, c in zip(world_names, world_colours)),
                        "subject_found": rate(name(im) == "subject" for im in subject_images),
                        "subject_false_alarm": rate(n == "subject" for n in world_names)}
    out.update(n_world=len(world_images), n_subject=len(subject_images))
    return out
