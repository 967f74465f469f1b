"""See DreamBooth work on a laptop: a toy world that shows the paper's two claims on 2 CPU cores.

    python examples/toyworld.py --out toyworld_run              # one seed
    python examples/toyworld.py --out toyworld_run --seeds 5    # 5 DreamBooth seeds on the same model
    python examples/toyworld.py --out /tmp/tw --tiny            # seconds: checks the pipeline only

Makes a world of 32x32 coloured shapes, pretrains a toy Stable Diffusion on it with this project's own UNet,
VAE and noise schedule, saves it as an ordinary diffusers folder, teaches it a cyan circle with thin white
lines ("a photo of sks circle") through `python train.py` (without and with prior preservation, and with
--pivotal, and on a busy background without and with a loss mask), and measures with a detector calibrated
before any of it: does "sks circle" show the subject, does "a circle" drift towards it, does "a red circle"
stay red, and how often the untouched model is read as the subject (the floor). Writes results.json (every
seed; mean and min..max; paths relative to --out), figure.png (the first seed) and seed_N/ into --out.
The code is in examples/toyworld/; docs/toyworld.md has the measured numbers.
"""
import os
import sys

# Idle OpenMP threads sleep instead of spinning: on shared cores spinning threads steal the CPU from the
# working ones (measured: 2 threads were 10x slower than 1 on a busy 2-core machine). Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from examples.toyworld.experiment import main  # noqa: E402  (after the environment is set)

if __name__ == "__main__":
    sys.exit(main())
