"""Text conditioning: CLIP tokenizer and text encoder (transformers' CLIPTextModel) for SD 1.x and 2.x.

SD 1.x conditions on OpenAI CLIP ViT-L/14's last layer (after the final LayerNorm); its single files
already use transformers' names. SD 2.x conditions on OpenCLIP ViT-H/14's *penultimate* layer followed by
the final LayerNorm (LDM `FrozenOpenCLIPEmbedder(layer="penultimate")`); `convert_open_clip` turns those
weights into an equivalent CLIPTextModel with one layer fewer. Both use the same 49408-token BPE.
"""
import html
import json
import re
import warnings
from pathlib import Path

import torch

from .errors import UserError

TOKENIZER_DIR = Path(__file__).parent / "tokenizer"  # vocab.json + merges.txt from OpenAI CLIP's BPE (MIT)
CONTEXT_LENGTH = 77  # CLIP's positions: BOS + 75 tokens + EOS
PAD_TOKEN = {"sd1": "<|endoftext|>", "sd2": "!"}  # SD 1.x pads with EOS (HF); SD 2.x with id 0 (open_clip.tokenize)
HIDDEN_ACT = {"sd1": "quick_gelu", "sd2": "gelu"}  # OpenAI CLIP: x*sigmoid(1.702x); OpenCLIP ViT-H: exact GELU

try:  # optional: the text repair OpenAI CLIP and open_clip apply before BPE (curly quotes, full-width, ligatures)
    import ftfy
except ImportError:
    ftfy = None


# ---------------------------------------------------------------------------------------------------
# Configuration

def text_config_from_state_dict(sd, version, heads=None):
    """CLIPTextConfig from tensor shapes (keys with or without `text_model.`).

    The head count is not stored in any tensor. Rule: heads of 64 channels when the width allows it
    (CLIP-L 768 -> 12, OpenCLIP-H 1024 -> 16), otherwise 8 channels per head (tiny test models: 32 -> 4).
    Pass `heads` to override.
    """
    from transformers import CLIPTextConfig

    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    try:
        vocab, hidden = sd["embeddings.token_embedding.weight"].shape
        positions = sd["embeddings.position_embedding.weight"].shape[0]
        intermediate = sd["encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as e:
        raise UserError(f"unknown text encoder architecture: tensor {e.args[0]} not found") from None
    layers = len({k.split(".")[2] for k in sd if k.startswith("encoder.layers.")})
    if heads is None:
        heads = hidden // 64 if hidden % 64 == 0 else hidden // 8
    return CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                          num_attention_heads=heads, max_position_embeddings=positions, hidden_act=HIDDEN_ACT[version],
                          layer_norm_eps=1e-5,
                          bos_token_id=vocab - 2, eos_token_id=vocab - 1)  # CLIP's special tokens are the last two


def text_config_from_json(config):
    """CLIPTextConfig from a diffusers folder's text_encoder/config.json dict (bookkeeping keys dropped)."""
    from transformers import CLIPTextConfig

    skip = ("architectures", "transformers_version", "model_type", "torch_dtype", "dtype")
    return CLIPTextConfig(**{k: v for k, v in config.items() if not k.startswith("_") and k not in skip})


def match_text_prefix(sd, model):
    """`sd` with its keys renamed to `model`'s convention: transformers 4 and SD files say
    `text_model.encoder...`, transformers 5's CLIPTextModel says `encoder...`. Drops `position_ids`,
    a constant arange that transformers 5 no longer saves (non-persistent buffer)."""
    prefix = "text_model." if any(k.startswith("text_model.") for k in model.state_dict()) else ""
    return {prefix + k.removeprefix("text_model."): v for k, v in sd.items() if not k.endswith("position_ids")}


# ---------------------------------------------------------------------------------------------------
# OpenCLIP (SD 2.x) -> CLIPTextModel

def convert_open_clip(sd):
    """OpenCLIP text-tower tensors (keys without `cond_stage_model.model.`) -> CLIPTextModel tensors.

    SD 2.x uses the output of resblock L-2 followed by ln_final, so the last resblock is dropped and the
    result is an (L-1)-layer CLIPTextModel whose final_layer_norm is ln_final. nn.MultiheadAttention
    stores q, k, v stacked in `in_proj_*` [3D, D]; CLIP keeps them as separate Linear layers.
    text_projection and logit_scale (contrastive head) are not used for conditioning.
    """
    blocks = sorted({int(m.group(1)) for k in sd if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))})
    if not blocks or "token_embedding.weight" not in sd:
        raise UserError("unknown text encoder architecture: no OpenCLIP token_embedding / resblocks")
    last = blocks[-1]
    p = "text_model."
    out = {p + "embeddings.token_embedding.weight": sd["token_embedding.weight"],
           p + "embeddings.position_embedding.weight": sd["positional_embedding"]}
    renames = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
               "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for key, value in sd.items():
        # `attn.in_proj_weight` -> `attn.in_proj.weight`, so every block tensor reads as <module>.<weight|bias>
        m = re.match(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$", key.replace("in_proj_", "in_proj."))
        if key in ("token_embedding.weight", "positional_embedding", "text_projection", "logit_scale", "attn_mask"):
            continue
        elif key.startswith("ln_final."):
            out[p + "final_layer_norm." + key.split(".")[-1]] = value
        elif m is None:
            raise UserError(f"unknown text encoder architecture: unexpected OpenCLIP tensor {key}")
        elif int(m.group(1)) == last:
            continue  # the last layer: SD 2.x never uses its output
        elif m.group(2) == "attn.in_proj":
            q, k, v = value.chunk(3, dim=0)
            for name, t in zip(("q_proj", "k_proj", "v_proj"), (q, k, v)):
                out[f"{p}encoder.layers.{m.group(1)}.self_attn.{name}.{m.group(3)}"] = t
        elif m.group(2) in renames:
            out[f"{p}encoder.layers.{m.group(1)}.{renames[m.group(2)]}.{m.group(3)}"] = value
        else:
            raise UserError(f"unknown text encoder architecture: unexpected OpenCLIP tensor {key}")
    return out


# ---------------------------------------------------------------------------------------------------
# Tokenizer

def _read_bpe(folder):
    """(vocab dict, merges list) from vocab.json + merges.txt, or from a tokenizer.json (transformers 5 saves only that)."""
    if (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        return vocab, merges
    if (folder / "tokenizer.json").exists():
        model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
        return model["vocab"], [tuple(m.split() if isinstance(m, str) else m) for m in model["merges"]]
    raise UserError(f"{folder} has no tokenizer (vocab.json + merges.txt, or tokenizer.json)")


def load_tokenizer(version, folder=None):
    """transformers' CLIPTokenizer from our packaged BPE files, or from a diffusers folder's tokenizer/.

    The pad token is set after construction on purpose: one passed to the constructor (or read from
    an SD 2.x folder's config) becomes an added special token, and then "!!!" is split into three "!"
    tokens, which open_clip.tokenize (what SD 2.x was trained with) does not do.
    """
    from transformers import CLIPTokenizer

    if version not in PAD_TOKEN:
        raise ValueError(f"version must be one of {list(PAD_TOKEN)}, got {version!r}")
    vocab, merges = _read_bpe(Path(folder) if folder is not None else TOKENIZER_DIR)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CONTEXT_LENGTH)
    tokenizer.pad_token = PAD_TOKEN[version]
    return tokenizer


def clean_text(text):
    """The text repair OpenAI CLIP / open_clip do before BPE (lower-casing is the tokenizer's):
    ftfy.fix_text when installed, HTML entities decoded (twice, as they do), whitespace collapsed."""
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return " ".join(text.split())


def tokenize(tokenizer, prompts):
    """Token ids [B, 77]: BOS, tokens, EOS, then padding. A longer prompt is cut to 77 with EOS kept
    last (as open_clip.tokenize does), with a warning saying what was cut."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    n = tokenizer.model_max_length
    rows = []
    for i, ids in enumerate(tokenizer([clean_text(p) for p in prompts], verbose=False).input_ids):
        if len(ids) > n:
            cut = ids[n - 1:-1]
            lost = tokenizer.decode(cut)
            warnings.warn(f"prompt {i} is {len(ids) - 2} tokens long; the text encoder reads at most {n - 2}, so the "
                          f"last {len(cut)} tokens were cut: {lost[:60] + '...' * (len(lost) > 60)!r}", stacklevel=2)
            ids = ids[:n - 1] + [tokenizer.eos_token_id]
        rows.append(ids + [tokenizer.pad_token_id] * (n - len(ids)))
    return torch.tensor(rows, dtype=torch.long)


def encode_prompt(tokenizer, text_encoder, prompts):
    """Prompts -> text context [B, 77, C] for the UNet's cross-attention.

    last_hidden_state already includes final_layer_norm: for SD 1.x that is CLIP-L's last layer; for
    SD 2.x the converted model's last layer is OpenCLIP's penultimate. Gradients flow when the caller
    enables them (text-encoder fine-tuning); wrap in torch.no_grad() otherwise.
    """
    param = next(text_encoder.parameters())
    ids = tokenize(tokenizer, prompts).to(param.device)
    return text_encoder(input_ids=ids).last_hidden_state.to(param.dtype)
