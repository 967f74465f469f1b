"""Class images for prior preservation, drawn once by the frozen base model and reused across runs.

DreamBooth (Ruiz et al. 2023, sec. 3.3) regularises fine-tuning with the model's own samples of the
class ("a photo of dog"), so that learning "sks dog" does not make every dog look like the subject.
Image i is always drawn from seed + i and written atomically as `NNNN.png`: an interrupted generation
keeps every finished image, and a later run draws only the missing ones, giving the same set.
"""
import re
from pathlib import Path

from tqdm.auto import tqdm

from .sampling import generate, parameters_text, save_png


def default_class_dir(model_name, class_prompt, resolution):
    """class_images/<model>/<prompt slug>-<resolution>: one set per model, prompt and size."""
    slug = re.sub(r"[^a-z0-9]+", "_", class_prompt.lower()).strip("_") or "class"
    return Path("class_images") / model_name / f"{slug}-{resolution}"


def class_image_paths(folder, n):
    return [Path(folder) / f"{i:04d}.png" for i in range(n)]


def ensure_class_images(sd, folder, prompt, n, resolution, steps=30, guidance=7.5, seed=0, batch_size=4,
                        negative_prompt=""):
    """Make sure `folder` holds class images 0..n-1; draw the missing ones. Returns their paths."""
    paths = class_image_paths(folder, n)
    missing = [i for i, p in enumerate(paths) if not p.exists()]
    if missing:
        Path(folder).mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=len(missing), desc=f"class images ({prompt!r})", unit="img")
        # Runs of consecutive missing indices are batched; each image still has its own seed.
        runs = []
        for i in missing:
            if runs and runs[-1][-1] == i - 1 and len(runs[-1]) < batch_size:
                runs[-1].append(i)
            else:
                runs.append([i])
        for run in runs:
            images = generate(sd, prompt, negative_prompt, num_images=len(run), steps=steps, guidance=guidance,
                              seed=seed + run[0], height=resolution, width=resolution, progress=False,
                              batch_size=batch_size)
            for i, image in zip(run, images):
                save_png(image, paths[i], parameters_text(prompt, negative_prompt, steps, guidance, seed + i,
                                                          resolution, resolution, sd.name, 0.0))
                bar.update(1)
        bar.close()
    return paths
