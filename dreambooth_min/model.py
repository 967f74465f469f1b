"""The loaded Stable Diffusion model: UNet, VAE, text encoder(s) and tokenizer(s), and what kind it is."""
from dataclasses import dataclass, field

import torch

from .conditioning import Cond, size_time_ids
from .text import encode_prompt, encode_prompt_sdxl

# model_index.json's key that marks random weights (make_tiny); diffusers ignores keys that start with '_'.
RANDOM_NOTE = "_dreambooth_min_random_weights"


@dataclass
class StableDiffusion:
    unet: torch.nn.Module  # eps or v prediction from (x_t, t, conditioning.Cond)
    vae: torch.nn.Module  # image <-> latent; latents are scaled by vae.scaling_factor outside it
    text_encoder: torch.nn.Module  # transformers CLIPTextModel
    tokenizer: object  # transformers CLIPTokenizer
    version: str  # "sd1" | "sd2" | "sdxl"
    prediction_type: str  # "epsilon" | "v_prediction"
    scheduler_config: dict = field(default_factory=dict)  # a diffusers folder's scheduler config, else {}
    name: str = "model"  # file or folder name (or Hub repo id), recorded in images and LoRA files
    source: dict = field(default_factory=dict)  # {"path"}, or {"repo_id", "revision", "file"} for a Hub model
    random_note: str = ""  # what a model of random weights is (make_tiny marks its folders), else ""
    text_encoder_2: torch.nn.Module = None  # SDXL: OpenCLIP bigG as transformers' CLIPTextModelWithProjection
    tokenizer_2: object = None  # SDXL: the same BPE, padding with "!"

    def encode_prompt(self, prompts):
        """The text conditioning of a list of prompts, a Cond: context [B, 77, C] for cross-attention, and
        for SDXL the pooled embedding [B, 1280] too (the size ids are the caller's: they depend on the image)."""
        if self.version == "sdxl":
            return Cond(*encode_prompt_sdxl((self.tokenizer, self.tokenizer_2),
                                            (self.text_encoder, self.text_encoder_2), list(prompts)))
        return Cond(encode_prompt(self.tokenizer, self.text_encoder, list(prompts)))

    def sampling_conds(self, prompt, negative_prompt, height, width):
        """(uncond, cond), one row each, for classifier-free guidance at image size height x width.

        SDXL: both carry the size ids of an uncropped image of that size (original = target = (h, w), crop
        (0, 0), as diffusers' and sgm's samplers), and an empty negative prompt is all zeros, context and
        pooled: SDXL dropped captions by zeroing their embeddings in training (sgm `ucg_rate`), and diffusers'
        `force_zeros_for_empty_prompt` samples the same way.
        """
        uncond, cond = self.encode_prompt([negative_prompt, prompt]).chunk(2)
        if self.version != "sdxl":
            return uncond, cond
        if not negative_prompt:
            uncond = Cond(torch.zeros_like(uncond.context), torch.zeros_like(uncond.pooled))
        ids = size_time_ids((height, width), (0, 0), (height, width))
        return uncond.with_time_ids(ids), cond.with_time_ids(ids)

    @property
    def default_resolution(self):
        """Image side the model was trained at: 1024 for SDXL, 768 for the SD 2.x v-models, else 512."""
        if self.version == "sdxl":
            return 1024
        return 768 if self.version == "sd2" and self.prediction_type == "v_prediction" else 512
