"""Steps to fidelity: a case with `curve` (cases.py) checkpoints every `curve_every` steps; each checkpoint
is sampled ("a photo of sks circle" and "a photo of a circle", the same noise as the final models) and read
by the same detector. `fidelity_90_at`: the first checkpoint step with fidelity >= 90%, and the drift there."""
from pathlib import Path

from .cases import CLASS_PROMPT, INSTANCE_PROMPT
from .finetune import load_model
from .measure import measure, sample_prompts


def checkpoints(run, steps):
    """[(step, LoRA file, embedding file or checkpoint state)] of a train.py run folder, in step order: its
    checkpoints, then the final LoRA (step `steps`) when no checkpoint has it."""
    found = sorted(Path(run).glob("checkpoints/step_*"))
    points = [(int(p.name.split("_")[1]), p / "lora.safetensors", p / "state.pt") for p in found
              if (p / "lora.safetensors").exists()]
    if not points or points[-1][0] < steps:
        points.append((steps, Path(run) / "lora.safetensors", Path(run) / "embedding.safetensors"))
    return points


def curve(s, seed, case, model_path, run, prototypes):
    """{"curve": [{step, fidelity, drift}], "fidelity_90_at": step or None, "drift_at_90": drift or None}."""
    points = []
    for step, lora, embedding in checkpoints(run, s.db_steps):
        sd = load_model(model_path, lora, embedding if case.token != "sks" else None, case.token)
        samples = sample_prompts(s, sd, seed, None, case, (INSTANCE_PROMPT, CLASS_PROMPT), s.curve_samples)
        numbers = measure(samples, prototypes)
        points.append({"step": step, "fidelity": numbers["fidelity"], "drift": numbers["drift"]})
    first = next((p for p in points if p["fidelity"] >= 0.9), None)
    return {"curve": points, "fidelity_90_at": first and first["step"], "drift_at_90": first and first["drift"]}


def _stats(vals):
    return {"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals)} if vals else None


def curve_summary(per_seed):
    """{case: {"reached": "k of n", "fidelity_90_at", "drift_at_90": {mean, min, max} over the seeds that
    reached 90% (None when none did), "by_step": {step: {"fidelity", "drift": {mean, min, max}}}}}."""
    out = {}
    names = {c for r in per_seed.values() for c in r.get("curves", {})}
    for name in sorted(names):
        rows = [r["curves"][name] for r in per_seed.values() if name in r.get("curves", {})]
        reached = [r for r in rows if r["fidelity_90_at"] is not None]
        out[name] = {"reached": f"{len(reached)} of {len(rows)}"}
        for key in ("fidelity_90_at", "drift_at_90"):
            out[name][key] = _stats([r[key] for r in reached])
        steps = sorted({p["step"] for r in rows for p in r["curve"]})
        out[name]["by_step"] = {str(k): {m: _stats([p[m] for r in rows for p in r["curve"] if p["step"] == k])
                                         for m in ("fidelity", "drift")} for k in steps}
    return out
