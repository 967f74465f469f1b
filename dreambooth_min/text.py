"""Text conditioning: CLIP tokenizer and text encoder (transformers' CLIPTextModel) for SD 1.x, 2.x and XL.

SD 1.x conditions on OpenAI CLIP ViT-L/14's last layer (after the final LayerNorm); its single files
already use transformers' names. SD 2.x conditions on OpenCLIP ViT-H/14's *penultimate* layer followed by
the final LayerNorm (LDM `FrozenOpenCLIPEmbedder(layer="penultimate")`); `convert_open_clip` in
formats/text_weights.py turns those weights into an equivalent CLIPTextModel with one layer fewer.
SDXL has both kinds at once (`encode_prompt_sdxl`). All use the same 49408-token BPE.
"""
import html
import json
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import UserError

TOKENIZER_DIR = Path(__file__).parent / "tokenizer"  # vocab.json + merges.txt from OpenAI CLIP's BPE (MIT)
CONTEXT_LENGTH = 77  # CLIP's positions: BOS + 75 tokens + EOS
PAD_TOKEN = {"sd1": "<|endoftext|>", "sd2": "!"}  # SD 1.x pads with EOS (HF); SD 2.x with id 0 (open_clip.tokenize)

try:  # optional: the text repair OpenAI CLIP and open_clip apply before BPE (curly quotes, full-width, ligatures)
    import ftfy
except ImportError:
    ftfy = None


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


_WARNED = set()


def _warn_once(message):
    """One line on stderr, once per message (a training run encodes its captions many times)."""
    if message not in _WARNED:
        _WARNED.add(message)
        tqdm.write(message, file=sys.stderr)


def _short(text, n=40):
    return text[:n] + "..." * (len(text) > n)


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
            _warn_once(f"warning: the prompt {_short(prompts[i])!r} is {len(ids) - 2} tokens long; the text encoder "
                       f"reads at most {n - 2}, so the last {len(cut)} were cut: {_short(lost)!r}")
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


def encode_prompt_sdxl(tokenizers, text_encoders, prompts):
    """SDXL's two text encoders -> (context [B, 77, 768 + 1280], pooled [B, 1280]) (Podell et al. 2023, sec. 2.1).

    The context is both encoders' *penultimate* hidden states side by side, without a final LayerNorm on
    either (sgm `FrozenCLIPEmbedder(layer="hidden", layer_idx=11)` and `FrozenOpenCLIPEmbedder2(layer=
    "penultimate")`); the pooled vector is OpenCLIP bigG's last layer, final LayerNorm, at the EOS token,
    times text_projection (`text_embeds` of transformers' CLIPTextModelWithProjection). Tokenizer 1
    pads with EOS (as SD 1.x), tokenizer 2 with "!" (as SD 2.x).
    """
    states = []
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        param = next(encoder.parameters())
        out = encoder(input_ids=tokenize(tokenizer, prompts).to(param.device), output_hidden_states=True)
        states.append(out.hidden_states[-2])
    dtype = next(text_encoders[0].parameters()).dtype
    return torch.cat([h.to(dtype) for h in states], dim=-1), out.text_embeds.to(dtype)
