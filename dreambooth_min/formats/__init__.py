"""Every foreign file layout, kept apart from the method so that the method never learns how others name or store
things: Stable Diffusion checkpoints and their name tables (checkpoint, checkpoint_names, checkpoint_sdxl, fill,
text_weights), LoRA files (lora_names, lora_file, lora_apply) and embedding files (embedding_file), safetensors
reading and writing (safetensors_io), models by Hub id (hub), our modules written as a diffusers folder (export),
tiny random models (make_tiny), PNGs with their parameters text (png) and the photos a run reads (images). It may
import the top of the package (the models, the method's LoRA layers, errors) and formats/ itself, never run/ or
watch/, which import it.
"""
