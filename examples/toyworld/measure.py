"""Sampling every model from the same noise, reading the samples with the detectors (detect.py), and the
numbers over seeds: mean and min..max of each metric, and whether each goal held on every seed."""
from tqdm.auto import tqdm

from . import detect, world
from .cases import CLASS_PROMPT, GOALS, INSTANCE_PROMPT, METRICS, PROMPTS, RED_PROMPT


def noise_seed(seed, offset):
    """First noise seed of a batch of pictures (sampling.generate draws picture i from seed + i) for
    DreamBooth seed `seed`: 100,000 apart, so that two seeds never share a picture's noise, and
    `offset` apart for the different batches of one seed (samples 1,000, colours 2,000, class images 5,000)."""
    return 100_000 * seed + offset


def sample_prompts(s, sd, seed, bar):
    """{prompt: [PIL images]}: image i of every prompt and every model starts from the same noise."""
    from dreambooth_min.sampling import generate

    found = {}
    for prompt in PROMPTS:
        found[prompt] = generate(sd, prompt, num_images=s.samples, steps=s.sample_steps, guidance=s.guidance,
                                 seed=noise_seed(seed, 1_000), height=world.SIZE, width=world.SIZE, progress=False,
                                 batch_size=64)
        bar.update(1)
    return found


def measure(samples, prototypes, margin=0.0):
    """The numbers of one model from its samples. fidelity, drift and red_kept use the calibrated
    nearest-colour detector (with `margin`, see detect.nearest); the *_magenta ones the pixel-hue detector."""
    subject, circle, red = samples[INSTANCE_PROMPT], samples[CLASS_PROMPT], samples[RED_PROMPT]
    near = lambda images: [detect.nearest(im, prototypes, margin) for im in images]
    return {"fidelity": detect.rate(n == "subject" for n in near(subject)),
            "drift": detect.rate(n == "subject" for n in near(circle)),
            "red_kept": detect.rate(n == "red" for n in near(red)),
            "fidelity_magenta_stripes": detect.rate(map(detect.shows_subject, subject)),
            "drift_magenta": detect.rate(map(detect.subject_sign, circle)),
            "red_kept_hue": detect.rate(detect.colour(im) == "red" for im in red),
            "circle_colours": _counts(near(circle))}


def _counts(names):
    found = {}
    for n in names:
        found[n] = found.get(n, 0) + 1
    return dict(sorted(found.items()))


def colour_accuracy(s, sd, seed, bar, prototypes):
    """Pretrained model only: share of "a photo of a {colour} {shape}" samples in that colour."""
    from dreambooth_min.sampling import generate

    hits, n = 0, max(1, s.samples // 8)
    for colour in world.COLOURS:
        for shape in world.SHAPES:
            images = generate(sd, f"a photo of a {colour} {shape}", num_images=n, steps=s.sample_steps,
                              guidance=s.guidance, seed=noise_seed(seed, 2_000), height=world.SIZE, width=world.SIZE,
                              progress=False, batch_size=64)
            hits += sum(detect.nearest(im, prototypes, s.margin) == colour for im in images)
        bar.update(1)
    return hits / (n * len(world.COLOURS) * len(world.SHAPES))


def sample_all(s, seed, models, load_model, prototypes):
    """({model: {prompt: images}}, {model: numbers}) for each model (cases.Case); `load_model(case)` gives
    its pipeline: the pretrained toy model, with that case's LoRA merged in."""
    bar = tqdm(total=len(models) * len(PROMPTS) + len(world.COLOURS), desc=f"sampling, seed {seed}", unit="prompt")
    samples, results = {}, {}
    for case in models:
        sd = load_model(case)
        samples[case.name] = sample_prompts(s, sd, seed, bar)
        results[case.name] = measure(samples[case.name], prototypes, s.margin)
        if case.name == "pretrained":
            results[case.name]["colour_accuracy"] = colour_accuracy(s, sd, seed, bar, prototypes)
    bar.close()
    return samples, results


def summary(per_seed):
    """{model: {metric: {"mean", "min", "max"}}} over the seeds' results ({seed: {model: numbers}})."""
    runs = list(per_seed.values())
    out = {}
    for model in runs[0]:
        if model == "goals":
            continue
        keys = [k for k, v in runs[0][model].items() if isinstance(v, float)]
        out[model] = {k: {"mean": sum(r[model][k] for r in runs) / len(runs), "min": min(r[model][k] for r in runs),
                          "max": max(r[model][k] for r in runs)} for k in keys}
    return out


def goals_every_seed(per_seed):
    """{label: met on every seed}, for the goals that were measured."""
    labels = [g.label for g in GOALS if all(g.label in r["goals"] for r in per_seed.values())]
    return {label: all(r["goals"][label] for r in per_seed.values()) for label in labels}


def _cell(stats, n_seeds):
    if n_seeds == 1:
        return f"{stats['mean']:.0%}"
    return f"{stats['mean']:.0%} ({stats['min']:.0%}..{stats['max']:.0%})"


def table(results, models):
    """The results as a markdown table: mean (min..max over seeds) of each metric of each model."""
    n = len(results["seeds"])
    rows = ["| model | fidelity: \"sks circle\" shows the subject | drift: \"a circle\" looks like the subject "
            "| \"a red circle\" still red |", "| --- | --- | --- | --- |"]
    for case in models:
        stats = results["summary"][case.name]
        rows.append(f"| {case.title} | " + " | ".join(_cell(stats[m], n) for m in METRICS) + " |")
    return "\n".join(rows)
