"""Pivotal tuning against plain DreamBooth-LoRA in the toy world: is fidelity reached in fewer steps?

    python examples/toyworld.py --out DIR --pivotal [--model DIR_OF_AN_EARLIER_RUN/model]

Both runs go through `python train.py` with the toy world's settings (prior preservation, LoRA rank 8 with
the text encoder, lr 2e-3, batch 4) and a checkpoint every `EVERY` steps; the second adds --pivotal (new tokens
<s0><s1>, initialised from "circle", with the same lr). The lr schedule is constant, so the checkpoint at step k
is what a k-step run would have written. Every checkpoint, and the base model (step 0), is sampled from the same
noise as the main experiment, and read with its calibrated detector:
  fidelity: "a photo of <id> circle" shows the subject (<id> = sks, or <s0><s1>);
  drift:    "a photo of a circle" looks like the subject.
Writes pivotal.json and prints a table. Without --model the toy model is pretrained first (about 7 minutes).
"""
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import detect, experiment, world

EVERY = 50
METHODS = {"dreambooth": ("sks", []), "pivotal": ("<s0><s1>", ["--pivotal"])}


def train_commands(s, model_path, out, class_dir, every=EVERY):
    """{method: train.py command}: the experiment's prior-preservation run, checkpointed every `every` steps."""
    commands = {}
    for method, (token, extra) in METHODS.items():
        cmd = experiment.train_command(s, model_path, out, method, class_dir)
        commands[method] = cmd + ["--prompt", "a photo of {token} circle", "--save-every", str(every),
                                  "--keep-checkpoints", "1000"] + extra  # later flags win
    return commands


def snapshots(run_dir, steps, every=EVERY):
    """[(step, LoRA file or None, {file key: new rows} or None)]: the base model, each checkpoint, the end."""
    found = [(0, None, None)]
    for step in range(every, steps, every):
        folder = run_dir / "checkpoints" / f"step_{step:06d}"
        state = torch.load(folder / "state.pt", weights_only=True)
        found.append((step, folder / "lora.safetensors", state.get("embeddings")))
    embedding = run_dir / "embedding.safetensors"
    if embedding.exists():
        from dreambooth_min.embedding_file import load_embedding

        final = {"clip_l": next(iter(load_embedding(embedding)[0].values()))}
    else:
        final = None
    found.append((steps, run_dir / "lora.safetensors", final))
    return found


def model_at(model_path, lora, rows, token, class_noun="circle"):
    """The toy model with a snapshot's LoRA merged and, for pivotal tuning, its new tokens (at step 0: the
    class noun's embedding, where training starts)."""
    from dreambooth_min import pivotal

    sd = experiment.load_model(model_path, lora)
    tokens = pivotal.split_tokens(token)
    if tokens:
        vectors = rows["clip_l"] if rows else pivotal.noun_vector(sd.tokenizer, sd.text_encoder, class_noun).expand(
            len(tokens), -1)
        pivotal.add_tokens(sd.tokenizer, sd.text_encoder, tokens, vectors)
    return sd


def measure(s, sd, token, prototypes):
    """fidelity and drift of one model: shares of 64 samples the calibrated detector names "subject"."""
    from dreambooth_min.sampling import generate

    def subject_rate(prompt):
        images = generate(sd, prompt, num_images=s.samples, steps=s.sample_steps, guidance=s.guidance,
                          seed=s.seed + 1_000, height=world.SIZE, width=world.SIZE, progress=False, batch_size=64)
        return detect.rate(detect.nearest(im, prototypes) == "subject" for im in images)

    return {"fidelity": subject_rate(f"a photo of {token} circle"), "drift": subject_rate(experiment.CLASS_PROMPT)}


def first_step(curve, key="fidelity", level=0.9):
    """The first measured step at which `key` reaches `level`, or None."""
    return next((row["step"] for row in curve if row[key] >= level), None)


def prepare(s, out, model_path):
    """(model folder, prototypes, class-image folder): the experiment's own, pretraining when no model is given."""
    from dreambooth_min import load

    if model_path is None:
        data = experiment.make_data(s, out)
        model_path, _ = experiment.pretrained_model(s, out, data)
    else:
        (out / "subject").mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(world.make_subject(s.subject_images, s.seed)):
            im.save(out / "subject" / f"{i:02d}.png")
    prototypes, _ = experiment.detector_check(s, load(model_path).vae)
    return Path(model_path), prototypes, experiment.class_images(s, model_path, out)


def run_comparison(s, out, model_path=None, every=EVERY):
    """Both runs, every snapshot measured; returns the results (also out/pivotal.json)."""
    from dreambooth_min.report import write_text_atomic

    torch.set_num_threads(s.threads)
    out, start = Path(out), time.time()
    model_path, prototypes, class_dir = prepare(s, out, model_path)
    commands, results = train_commands(s, model_path, out, class_dir, every), {}
    for method, cmd in commands.items():
        t = time.time()
        experiment.run_train(cmd, s.threads)
        seconds, token = round(time.time() - t, 1), METHODS[method][0]
        curve = []
        for step, lora, rows in tqdm(snapshots(out / "runs" / method, s.db_steps, every), desc=f"measuring {method}"):
            curve.append({"step": step} | measure(s, model_at(model_path, lora, rows, token), token, prototypes))
        results[method] = {"curve": curve, "train_seconds": seconds, "fidelity_90_at": first_step(curve),
                           "command": " ".join(cmd[1:])}
    results.update(settings=asdict(s), model=str(model_path), seconds=round(time.time() - start, 1))
    write_text_atomic(out / "pivotal.json", json.dumps(results, indent=2))
    return results


def table(results):
    """Fidelity and drift per step, both methods side by side (markdown)."""
    rows = ["| steps | fidelity, DreamBooth-LoRA (sks) | fidelity, pivotal (<s0><s1>) | drift, DreamBooth-LoRA "
            "| drift, pivotal |", "| --- | --- | --- | --- | --- |"]
    for a, b in zip(results["dreambooth"]["curve"], results["pivotal"]["curve"]):
        rows.append(f"| {a['step']} | {a['fidelity']:.0%} | {b['fidelity']:.0%} | {a['drift']:.0%} | {b['drift']:.0%} |")
    return "\n".join(rows)


def main(s, out, model_path=None):
    results = run_comparison(s, out, model_path)
    print(table(results))
    for method in METHODS:
        r = results[method]
        print(f"{method}: fidelity >= 90% first at step {r['fidelity_90_at']}; train.py took {r['train_seconds']} s")
    print(f"numbers: {Path(out) / 'pivotal.json'}")
    return 0
