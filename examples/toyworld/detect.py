"""The instrument: reads a 32x32 sample and names its shape's colour (a world colour, or "subject").

Calibration (`calibrate`), fixed before any DreamBooth run: world pictures, subject pictures and pictures of
the subject on the busy background, of a seed no training used, passed through the toy model's own
autoencoder (what the model *can* draw), give the prototypes: the mean RGB of the shapes of each world
colour, of the subject's shapes, and of the world's backgrounds, and the backgrounds' tints (below). Nothing
else is calibrated or tuned; there is no margin and no threshold.

The rule (`_read`): a colour is the subject when it is nearer the subject's prototype than any blend of the
world's prototypes and the background (their convex hull: what the pretrained model draws for a prompt
that names no colour, and a shape's edge darkened towards the background); else it is the nearest world
colour. The subject (cyan and white stripes) lies outside that hull, so no blend of world colours reads as
it; `floor` in results.json is how often the untouched model is read as the subject anyway.

Two readings with the same rule, both reported:
1. `nearest` (the headline numbers): the shape's mean RGB.
2. `pixel_vote` (the *_pixels numbers): every pixel of the shape read by itself; the shape gets the name
   most of its pixels have.

The background (`busy`, for the masked cases): a picture's background is the busy one when its tint (the
distance of its mean colour from the grey axis) is nearer the mean tint of autoencoded pictures on the busy
background than that of the world's grey backgrounds (both calibrated, as above; no threshold of our own).
The tint, not the pattern: the toy autoencoder keeps the purple of the busy checks but flattens their
4-pixel squares (measured: the pixels' spread about their median falls from 25 to about 10, the world's 3).

Foreground = pixels with a channel >= 90 (FOREGROUND): the world's backgrounds are <= 35, the busy one's
<= 88, and every shape colour has a channel >= 175, so this is a property of the world, not a tuned number. Fewer than
12 such pixels = no shape ("none"); a 32x32 picture's smallest shape has about 100.
"""
from itertools import combinations

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


def calibrate(world_images, world_colours, subject_images, busy_images=()):
    """{name: mean RGB}: the prototype of each world colour and of "subject" (the mean of its shapes' mean
    colours), and "background" (the world pictures' mean background colour); with `busy_images` (pictures on
    a busy background) also "tint": {"plain", "busy"}, the mean background tint of the world pictures and
    of those. The only parameters."""
    groups = {}
    for im, name in list(zip(world_images, world_colours)) + [(im, "subject") for im in subject_images]:
        c = mean_colour(im)
        if c is not None:
            groups.setdefault(name, []).append(c)
    found = {name: np.mean(cs, 0).tolist() for name, cs in groups.items()}
    found["background"] = np.mean([background_colour(im) for im in world_images], 0).tolist()
    if len(busy_images):
        found["tint"] = {"plain": float(np.mean([background_tint(im) for im in world_images])),
                         "busy": float(np.mean([background_tint(im) for im in busy_images]))}
    return found


def _world_names(prototypes):
    return sorted(n for n in prototypes if n not in ("subject", "background", "tint"))


def hull_distance(colours, vertices):
    """Exact distance of each row of `colours` [N, 3] to the convex hull of `vertices` [K, 3]: the nearest
    point of a 3-d hull lies inside one of its simplices of at most 4 vertices (Caratheodory), where it is
    the projection onto that simplex's affine span with non-negative weights; 0 inside the hull."""
    best = np.full(len(colours), np.inf)
    for k in range(1, min(4, len(vertices)) + 1):
        for subset in combinations(range(len(vertices)), k):
            v = vertices[list(subset)]
            x, d = colours - v[0], v[1:] - v[0]
            if k > 1 and np.linalg.matrix_rank(d) < k - 1:
                continue  # a degenerate simplex (collinear, coplanar): its faces are covered by the others
            a = x @ d.T @ np.linalg.inv(d @ d.T) if k > 1 else np.zeros((len(x), 0))
            inside = (a >= -1e-9).all(1) & (a.sum(1) <= 1 + 1e-9)
            dist = np.sqrt(((x - a @ d) ** 2).sum(1))
            best = np.where(inside, np.minimum(best, dist), best)
    return best


def _read(colours, prototypes):
    """Name of each row of `colours` [N, 3]: "subject" when nearer the subject's prototype than any blend of
    the world's colours and the background (the hull), else the nearest world colour."""
    world = _world_names(prototypes)
    table = np.array([prototypes[n] for n in world], dtype=np.float64)
    d_hull = hull_distance(colours, np.vstack([table, prototypes["background"]]))
    d_subject = np.sqrt(((colours - np.asarray(prototypes["subject"])) ** 2).sum(-1))
    nearest_world = np.argmin(((colours[:, None, :] - table[None]) ** 2).sum(-1), axis=1)
    return ["subject" if ds < dh else world[i] for ds, dh, i in zip(d_subject, d_hull, nearest_world)]


def nearest(image, prototypes):
    """The shape's name read from its mean colour (`_read`); "none" without a shape."""
    c = mean_colour(image)
    return "none" if c is None else _read(c[None], prototypes)[0]


def pixel_vote(image, prototypes):
    """The name most of the shape's pixels have, each pixel read by itself (`_read`); "none" without a shape."""
    fg = foreground(image)
    if fg is None:
        return "none"
    names, counts = np.unique(_read(fg, prototypes), return_counts=True)
    return str(names[counts.argmax()])


def background_colour(image):
    """Mean RGB of the background (every pixel that is not the shape's)."""
    a = _pixels(image)
    return a[a.max(-1) < FOREGROUND].astype(np.float64).mean(0)


def background_tint(image):
    """Distance of the background's mean colour from the grey axis (RGB units): about 0 for the world's
    grey backgrounds, 49 for the busy purple checks as rendered (about 41 autoencoded)."""
    c = background_colour(image)
    return 0.0 if np.isnan(c).any() else float(np.linalg.norm(c - c.mean()))


def busy(image, prototypes):
    """True when the background's tint is nearer the busy background's calibrated tint than the world's."""
    tint, proto = background_tint(image), prototypes["tint"]
    return abs(tint - proto["busy"]) < abs(tint - proto["plain"])


def rate(flags):
    flags = list(flags)
    return sum(map(bool, flags)) / max(1, len(flags))


def accuracy(world_images, world_colours, subject_images, prototypes, busy_images=()):
    """Both readings on pictures the prototypes were not made from: world colour right, subject found,
    subject named where there is none (false alarm); with `busy_images`, the background reading too."""
    out = {}
    if len(busy_images):
        out["background"] = {"busy_found": rate(busy(im, prototypes) for im in busy_images),
                             "busy_false_alarm": rate(busy(im, prototypes) for im in world_images),
                             "subject_found_on_busy": rate(nearest(im, prototypes) == "subject" for im in busy_images)}
    for reading, read in (("nearest", nearest), ("pixel_vote", pixel_vote)):
        name = lambda im: read(im, prototypes)
        world_names = [name(im) for im in world_images]
        out[reading] = {"colour_correct": rate(n == c for n, c in zip(world_names, world_colours)),
                        "subject_found": rate(name(im) == "subject" for im in subject_images),
                        "subject_false_alarm": rate(n == "subject" for n in world_names)}
    out.update(n_world=len(world_images), n_subject=len(subject_images))
    return out

