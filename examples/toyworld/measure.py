"""Sampling every model from the same noise, reading the samples with the detectors (detect.py), and the
numbers over seeds: mean and min..max of each metric, and whether each goal held on every seed."""
from tqdm.auto import tqdm

from . import detect, world
from .cases import BACKGROUND_METRICS, CLASS_PROMPT, GOALS, INSTANCE_PROMPT, METRICS, PROMPTS, RED_PROMPT


def noise_seed(seed, offset):
    """First noise seed of a batch of pictures (sampling.generate draws picture i from seed + i) for
    DreamBooth seed `seed`: 100,000 apart, so that two seeds never share a picture's noise, and
    `offset` apart for the different batches of one seed (samples 1,000, colours 2,000, class images 5,000)."""
    return 100_000 * seed + offset


def sample_prompts(s, sd, seed, bar, case, prompts=PROMPTS, n=None):
    """{prompt: [PIL images]}: image i of every prompt and every model starts from the same noise; `case`
    (cases.Case) is asked with its own identifier."""
    from dreambooth_min.sampling import generate

    found = {}
    for prompt in prompts:
        found[prompt] = generate(sd, case.prompt(prompt), num_images=n or s.samples, steps=s.sample_steps,
                                 guidance=s.guidance, seed=noise_seed(seed, 1_000), height=world.SIZE,
                                 width=world.SIZE, progress=False, batch_size=64)
        if bar is not None:
            bar.update(1)
    return found


def measure(samples, prototypes):
    """The numbers of one model from its samples: fidelity, drift and red_kept read by the shape's mean
    colour (detect.nearest), the *_pixels ones by its pixels' vote (detect.pixel_vote); `floor`: the largest
    share of any prompt's samples read as the subject (the untouched model's is the detector's floor); `busy`,
    `busy_class`: the share of "sks circle" and "a circle" samples on the busy background (detect.busy)."""
    out = {}
    for suffix, read in (("", detect.nearest), ("_pixels", detect.pixel_vote)):
        names = {p: [read(im, prototypes) for im in images] for p, images in samples.items()}
        if INSTANCE_PROMPT in names:
            out["fidelity" + suffix] = detect.rate(n == "subject" for n in names[INSTANCE_PROMPT])
        out["drift" + suffix] = detect.rate(n == "subject" for n in names[CLASS_PROMPT])
        if RED_PROMPT in names:
            out["red_kept" + suffix] = detect.rate(n == "red" for n in names[RED_PROMPT])
            out["red_subject" + suffix] = detect.rate(n == "subject" for n in names[RED_PROMPT])
            out["floor" + suffix] = max(detect.rate(n == "subject" for n in v) for v in names.values())
        if suffix == "":
            out["circle_colours"] = _counts(names[CLASS_PROMPT])
    if "tint" in prototypes:  # the masked cases' reading: did the busy background come along?
        for key, prompt in (("busy", INSTANCE_PROMPT), ("busy_class", CLASS_PROMPT)):
            if prompt in samples:
                out[key] = detect.rate(detect.busy(im, prototypes) for im in samples[prompt])
    return out


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
            hits += sum(detect.nearest(im, prototypes) == colour for im in images)
        bar.update(1)
    return hits / (n * len(world.COLOURS) * len(world.SHAPES))


def sample_all(s, seed, models, load_model, prototypes):
    """({model: {prompt: images}}, {model: numbers}) for each model (cases.Case); `load_model(case)` gives
    its pipeline: the pretrained toy model, with that case's LoRA merged in."""
    bar = tqdm(total=len(models) * len(PROMPTS) + len(world.COLOURS), desc=f"sampling, seed {seed}", unit="prompt")
    samples, results = {}, {}
    for case in models:
        sd = load_model(case)
        samples[case.name] = sample_prompts(s, sd, seed, bar, case)
        results[case.name] = measure(samples[case.name], prototypes)
        if case.name == "pretrained":
            results[case.name]["colour_accuracy"] = colour_accuracy(s, sd, seed, bar, prototypes)
    bar.close()
    return samples, results


def summary(per_seed):
    """{model: {metric: {"mean", "min", "max"}}} over the seeds' results ({seed: {model: numbers}}); a model
    over the seeds that have it."""
    out = {}
    for model in dict.fromkeys(m for r in per_seed.values() for m in r if m not in ("goals", "curves")):
        runs = [r[model] for r in per_seed.values() if model in r]
        keys = [k for k, v in runs[0].items() if isinstance(v, float)]
        out[model] = {k: {"mean": sum(r[k] for r in runs) / len(runs), "min": min(r[k] for r in runs),
                          "max": max(r[k] for r in runs)} for k in keys}
    return out


def goals_every_seed(per_seed):
    """{label: met on every seed}, for the goals that were measured."""
    labels = [g.label for g in GOALS if all(g.label in r["goals"] for r in per_seed.values())]
    return {label: all(r["goals"][label] for r in per_seed.values()) for label in labels}


def _cell(stats, n_seeds):
    if n_seeds == 1:
        return f"{stats['mean']:.0%}"
    return f"{stats['mean']:.0%} ({stats['min']:.0%}..{stats['max']:.0%})"


def _table(results, models, header, metrics, floor_row=False):
    """Markdown rows: one per model, mean (min..max over seeds) of each of `metrics`; with `floor_row`, under the
    pretrained model how often that model (which never saw the subject) is read as the subject."""
    n = len(results["seeds"])
    rows = ["| model | " + " | ".join(header) + " |", "| --- " * (len(header) + 1) + "|"]
    for case in models:
        stats = results["summary"][case.name]
        rows.append(f"| {case.title} | " + " | ".join(_cell(stats[m], n) for m in metrics) + " |")
        if floor_row and case.name == "pretrained":
            rows.append("| floor: the pretrained model read as the subject, per prompt | " + " | ".join(
                _cell(stats[m], n) for m in ("fidelity", "drift", "red_subject")) + " |")
    return "\n".join(rows)


def table(results, models):
    """The results as a markdown table: mean (min..max over seeds) of each metric of each model."""
    header = ('fidelity: "sks circle" shows the subject', 'drift: "a circle" looks like the subject',
              '"a red circle" still red')
    return _table(results, models, header, METRICS, floor_row=True)


def background_table(results, models):
    """The masked cases as a markdown table (the pretrained model first: the floor of the reading). Fidelity in
    both readings: on a purple background the shape's blurred rim pulls its mean colour towards purple, a
    blend of the world's red and blue (seed 0: (68, 154, 180) against the subject's (53, 201, 214)); the
    pixel vote reads the rim's pixels one by one, and they are too few to outvote the circle's."""
    header = ("fidelity (shape's mean colour)", "fidelity (pixel vote)", '"sks circle" on a busy background',
              '"a circle" on a busy background')
    return _table(results, models, header, BACKGROUND_METRICS)
