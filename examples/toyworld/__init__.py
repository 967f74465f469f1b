"""A toy world in which DreamBooth's two claims can be seen on a CPU in minutes, with no pretrained weights.

world.py: the pictures (one coloured shape on a dark background) and the DreamBooth subject.
detect.py: the pixel detectors that read samples.
model.py: the toy Stable Diffusion (this project's UNet, VAE and schedule) and its pretraining.
experiment.py: pretraining, DreamBooth through train.py, sampling, measuring; `main` is the command
`python examples/toyworld.py --out DIR`.
"""
