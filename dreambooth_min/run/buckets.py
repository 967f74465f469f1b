"""--aspect-buckets: photos of any shape are trained whole, each resized into the nearest of a few sizes.

A bucket is a size (height, width) of about R x R pixels (R = --resolution) with sides that are multiples of 64.
Each photo goes to the bucket nearest its aspect ratio and is resized to cover it; only the sliver that does
not fit is cut, evenly from both sides. Every micro-batch is drawn from one bucket (its latents must stack);
the epoch's order is still data.epoch_order's permutation, so any step's batch is known without replaying
the run (resume), and every process under torchrun cuts the same batches.

The sizes: at R = 1024 SDXL's own training buckets (Podell et al. 2023, appendix); otherwise kohya's rule
(sd-scripts' make_bucket_resolutions) with sides from R/2 to 2R, which at R = 512 is kohya's default list.
"""
import math
from collections import Counter

import torch

from ..errors import SettingError

STEP = 64  # bucket sides are multiples of this

# (height, width), as the SDXL report lists them: from 512 x 2048 to 2048 x 512 (40 sizes, not quite symmetric).
SDXL_BUCKETS = tuple((h, w) for h, widths in (
    (512, (2048, 1984, 1920, 1856)), (576, (1792, 1728, 1664)), (640, (1600, 1536)), (704, (1472, 1408, 1344)),
    (768, (1344, 1280)), (832, (1216, 1152)), (896, (1152, 1088)), (960, (1088, 1024)), (1024, (1024, 960)),
    (1088, (960, 896)), (1152, (896, 832)), (1216, (832,)), (1280, (768,)), (1344, (768,)), (1408, (704,)),
    (1472, (704,)), (1536, (640,)), (1600, (640,)), (1664, (576,)), (1728, (576,)), (1792, (576,)),
    (1856, (512,)), (1920, (512,)), (1984, (512,)), (2048, (512,))) for w in widths)


def bucket_list(resolution):
    """The bucket sizes (height, width) for training at about `resolution`^2 pixels, sorted."""
    if resolution == 1024:
        return tuple(sorted(SDXL_BUCKETS))
    if resolution < STEP:
        raise SettingError("resolution", f"must be at least {STEP} with --aspect-buckets (bucket sides are multiples "
                                         f"of {STEP}), not {resolution}")
    area = resolution * resolution
    low, high = max(STEP, resolution // 2 // STEP * STEP), resolution * 2 // STEP * STEP
    square = int(math.sqrt(area)) // STEP * STEP
    sizes = {(square, square)}
    for width in range(low, high + 1, STEP):  # each width with the tallest height that keeps the area <= R^2
        height = min(high, area // width // STEP * STEP)
        if height >= low:
            sizes |= {(height, width), (width, height)}
    return tuple(sorted(sizes))


def bucket_for(size, buckets):
    """The bucket whose aspect ratio is nearest (in log ratio) that of a photo of `size` (height, width)."""
    h, w = size
    return min(buckets, key=lambda b: abs(math.log(b[1] / b[0]) - math.log(w / h)))


def bucket_sizes(photo_buckets):
    """How many photos each bucket holds, [n_b] in bucket order; None without buckets."""
    return None if photo_buckets is None else [n for _, n in sorted(Counter(photo_buckets).items())]


def epoch_batch(order, pos, batch_size, photo_buckets=None):
    """Micro-batch `pos` of an epoch whose photos come in `order` (data.epoch_order), at most `batch_size` photos.

    Without buckets: the order cut into consecutive batches. With them (each photo's bucket in
    `photo_buckets`): each bucket's photos, in the epoch's order, cut into batches; the batches in the order of
    their first photo. An epoch then has sum_b ceil(n_b / batch_size) batches, whatever the order.
    """
    if photo_buckets is None:
        return order[pos * batch_size:(pos + 1) * batch_size]
    groups = {}
    for i in order.tolist():
        groups.setdefault(photo_buckets[i], []).append(i)
    batches = [g[k:k + batch_size] for g in groups.values() for k in range(0, len(g), batch_size)]
    first = {i: k for k, i in enumerate(order.tolist())}
    batches.sort(key=lambda b: first[b[0]])
    return torch.tensor(batches[pos], dtype=order.dtype)


def class_counts(photo_buckets, n):
    """{bucket: class images} for the buckets in use: the n class images shared in proportion to the photos
    (largest remainder), and at least one each, so that every batch has class images of its size."""
    photos = Counter(photo_buckets)
    share = {b: n * k / len(photo_buckets) for b, k in photos.items()}
    counts = {b: int(s) for b, s in share.items()}
    for b in sorted(share, key=lambda b: (counts[b] - share[b], b))[:n - sum(counts.values())]:
        counts[b] += 1
    return {b: max(1, k) for b, k in sorted(counts.items())}


def describe(photo_buckets, resolution):
    """The plan's line: 'WxH: n photos' per bucket in use."""
    counts = sorted(Counter(photo_buckets).items(), key=lambda item: (-item[1], item[0]))
    line = ", ".join(f"{w}x{h}: {k} photo{'s' * (k != 1)}" for (h, w), k in counts) + " (width x height)"
    if len(bucket_list(resolution)) == 1:  # below 2 x 64 px only the square fits: buckets change nothing
        line += f"; at {resolution} px the square is the only bucket, so every photo is centre-cropped"
    return line
