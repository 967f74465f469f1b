"""A toy world in which DreamBooth's two claims can be seen on a CPU in minutes, with no pretrained weights.

world.py: the pictures (one coloured shape on a dark background) and the DreamBooth subject.
detect.py: the detector that reads samples, calibrated on autoencoded pictures only.
cases.py: the DreamBooth runs compared, and the goals; finetune.py: class images and train.py runs.
measure.py: sampling and the numbers over seeds; curves.py: checkpoints sampled, steps to 90% fidelity.
model.py: the toy Stable Diffusion (this project's UNet, VAE and schedule) and its pretraining.
experiment.py: pretraining, DreamBooth through train.py, sampling, measuring; `main` is the command
`python examples/toyworld.py --out DIR`.
"""
