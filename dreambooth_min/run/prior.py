"""Class images for prior preservation, drawn once by the frozen base model and reused across runs.

DreamBooth (Ruiz et al. 2023, sec. 3.3) regularises fine-tuning with the model's own samples of the
class ("a photo of dog"), so that learning "sks dog" does not make every dog look like the subject.
Image i is always drawn from seed + i and written atomically as `NNNN.png`: an interrupted generation
keeps every finished image, and a later run draws only the missing ones, giving the same set. An image
that does not read back whole (damaged on the disk, or copied in half) is drawn again.
"""
import re
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from ..errors import OutOfMemory, is_out_of_memory
from ..formats.png import parameters_text, save_png
from ..sampling import BATCH_SIZE, ETA, GUIDANCE, generate


def default_class_dir(model_name, class_prompt, resolution):
    """class_images/<model>/<prompt slug>-<resolution>: one set per model, prompt and size."""
    slug = re.sub(r"[^a-z0-9]+", "_", class_prompt.lower()).strip("_") or "class"
    return Path("class_images") / model_name / f"{slug}-{resolution}"


def class_image_paths(folder, n):
    return [Path(folder) / f"{i:04d}.png" for i in range(n)]


def damaged(path):
    """Why the PNG at `path` cannot be used (truncated, corrupt), or None when it decodes whole."""
    try:
        with Image.open(path) as im:
            im.load()  # decodes every row: a truncated file fails here, which verify() alone may not catch
    except (OSError, SyntaxError, ValueError) as e:
        return str(e) or type(e).__name__
    return None


def ensure_class_images(sd, folder, prompt, n, resolution, steps, guidance=GUIDANCE, seed=0, batch_size=BATCH_SIZE,
                        negative_prompt="", log=tqdm.write, rank=0, world=1):
    """Make sure `folder` holds class images 0..n-1 of size `resolution` (R, or (height, width) for an aspect
    bucket); draw the missing or damaged ones. Returns their paths.

    Under torchrun, process `rank` of `world` draws the blocks of `batch_size` indices numbered rank,
    rank + world, ...: the same batches, hence the same files, as one process, and nothing to agree on.

    Out of memory while drawing raises errors.OutOfMemory (one line with advice); the images drawn so far stay."""
    paths = class_image_paths(folder, n)
    mine = [i for i in range(n) if i // batch_size % world == rank]
    missing = [i for i in mine if not paths[i].exists()]
    broken = [i for i in mine if i not in missing and damaged(paths[i])]
    if broken:
        log(f"warning: {len(broken)} class image(s) in {folder} do not read back whole "
            f"({', '.join(paths[i].name for i in broken[:5])}{', ...' if len(broken) > 5 else ''}): drawn again")
        missing = sorted(missing + broken)
    if missing:
        try:
            _draw(sd, paths, missing, prompt, resolution, steps, guidance, seed, batch_size, negative_prompt,
                  show=rank == 0)
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            kept = sum(p.exists() for p in paths)
            raise OutOfMemory(f"out of memory drawing class images ({kept} of {n} in {folder} are kept and reused): "
                              f"try a lower --resolution (this run: {resolution}) or --precision fp16 (CUDA)") from None
    return paths


def _draw(sd, paths, missing, prompt, resolution, steps, guidance, seed, batch_size, negative_prompt, show=True):
    height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(missing), desc=f"class images ({prompt!r})", unit="img", disable=not show)
    # Consecutive missing indices within a block of batch_size are batched; each image still has its own seed.
    runs = []
    for i in missing:
        if runs and runs[-1][-1] == i - 1 and i % batch_size:
            runs[-1].append(i)
        else:
            runs.append([i])
    try:
        for run in runs:
            images = generate(sd, prompt, negative_prompt, num_images=len(run), steps=steps, guidance=guidance,
                              seed=seed + run[0], height=height, width=width, progress=False,
                              batch_size=batch_size)
            for i, image in zip(run, images):
                save_png(image, paths[i], parameters_text(prompt, negative_prompt, steps, guidance, seed + i,
                                                          width, height, sd.name, ETA))
                bar.update(1)
    except KeyboardInterrupt:
        bar.close()  # ends the bar's line, so that what follows has a line of its own
        kept = sum(p.exists() for p in paths)
        kept = f": the {kept} class images drawn so far (in {paths[0].parent}) are reused" if kept > 1 else \
            f": the class image drawn so far ({paths[0].parent}) is reused" if kept else ""
        raise KeyboardInterrupt(f"run the same command again{kept}") from None
    bar.close()
