"""Examples that use dreambooth_min; `python examples/toyworld.py --out DIR` runs the toy-world experiment."""
