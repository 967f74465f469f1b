"""The loaded Stable Diffusion model: UNet, VAE, text encoder and tokenizer, and what kind it is."""
from dataclasses import dataclass, field

import torch

from .text import encode_prompt

# model_index.json's key that marks random weights (make_tiny); diffusers ignores keys that start with '_'.
RANDOM_NOTE = "_dreambooth_min_random_weights"


@dataclass
class StableDiffusion:
    unet: torch.nn.Module  # eps or v prediction from (x_t, t, text context)
    vae: torch.nn.Module  # image <-> latent; latents are scaled by vae.scaling_factor outside it
    text_encoder: torch.nn.Module  # transformers CLIPTextModel
    tokenizer: object  # transformers CLIPTokenizer
    version: str  # "sd1" | "sd2"
    prediction_type: str  # "epsilon" | "v_prediction"
    scheduler_config: dict = field(default_factory=dict)  # a diffusers folder's scheduler config, else {}
    name: str = "model"  # file or folder name (or Hub repo id), recorded in images and LoRA files
    source: dict = field(default_factory=dict)  # {"path"}, or {"repo_id", "revision", "file"} for a Hub model
    random_note: str = ""  # what a model of random weights is (make_tiny marks its folders), else ""

    def encode_prompt(self, prompts):
        """Text context [B, 77, C] for a list of prompts (the UNet's cross-attention input)."""
        return encode_prompt(self.tokenizer, self.text_encoder, list(prompts))

    @property
    def default_resolution(self):
        """Image side the model was trained at: 768 for the SD 2.x v-models, else 512."""
        return 768 if self.version == "sd2" and self.prediction_type == "v_prediction" else 512
