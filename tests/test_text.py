"""Text side: tokenizer ids vs open_clip.tokenize, CLIPTextModel round trip (SD 1.x), and the OpenCLIP
penultimate-layer conversion (SD 2.x) vs a plain-torch OpenCLIP forward, on tiny seeded models."""
import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import CLIPTextConfig, CLIPTextModel

from dreambooth_min.errors import UserError
from dreambooth_min.formats.text_weights import convert_open_clip, match_text_prefix, text_config_from_json
from dreambooth_min.formats.text_weights import text_config_from_state_dict
from dreambooth_min.text import TOKENIZER_DIR, encode_prompt, load_tokenizer, tokenize

from conditioning import assert_well_conditioned

PROMPTS = ["a photo of sks dog", "A PHOTO OF SKS DOG in Paris!!! It's 3.14 o'clock, (masterpiece:1.2)",
           "café naïve Zürich 東京 🐶 — ok?", "“curly quotes” &amp; ＦＵＬＬ width ﬁne", "  spaces\tand\nnewlines  ", ""]
LONG = "a very detailed photograph of a dog, " * 20  # > 75 tokens


@pytest.fixture(scope="module")
def open_clip_tokenize():
    """open_clip.tokenize, loaded from its file: importing the open_clip package needs torchvision."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("open_clip_torch is not installed")
    pytest.importorskip("ftfy")
    path = Path(spec.origin).parent / "tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("_open_clip_tokenizer", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.tokenize


def sd1_ids(open_clip_ids):
    """open_clip pads with 0; SD 1.x (transformers' tokenizer) pads with <|endoftext|>."""
    ids = open_clip_ids.clone()
    after_eos = (ids == 49407).long().cumsum(1).roll(1, dims=1).clamp(max=1).bool()
    after_eos[:, 0] = False
    ids[after_eos] = 49407
    return ids


# ---------------------------------------------------------------------------------------------------
# Tokenizer

def test_tokenizer_files():
    tok = load_tokenizer("sd1")
    assert len(tok) == 49408 and tok.bos_token_id == 49406 and tok.eos_token_id == 49407
    assert tok.model_max_length == 77 and tok.pad_token_id == 49407
    assert load_tokenizer("sd2").pad_token_id == 0
    assert torch.equal(tokenize(tok, "a dog"), tokenize(tok, ["a dog"]))  # a lone string is one prompt
    assert (TOKENIZER_DIR / "merges.txt").read_text(encoding="utf-8").startswith("#version: 0.2\n")


@pytest.mark.parametrize("version", ["sd1", "sd2"])
def test_tokenize_matches_open_clip(open_clip_tokenize, version):
    expected = open_clip_tokenize(PROMPTS)
    if version == "sd1":
        expected = sd1_ids(expected)
    assert torch.equal(tokenize(load_tokenizer(version), PROMPTS), expected)


def test_long_prompt_is_cut_with_one_warning_line(capsys):
    ids = tokenize(load_tokenizer("sd2"), ["short", LONG])
    assert ids.shape == (2, 77) and ids[1, 0] == 49406 and ids[1, 76] == 49407
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"warning: the prompt {LONG[:40]!r}"[:-1])
    assert "the last" in lines[0] and "were cut" in lines[0]
    tokenize(load_tokenizer("sd2"), [LONG])  # the same prompt again (every training step): no second line
    assert capsys.readouterr().err == ""


def test_long_prompt_is_cut_as_open_clip_cuts_it(open_clip_tokenize):
    ids = tokenize(load_tokenizer("sd2"), [LONG, "short"])
    assert torch.equal(ids, open_clip_tokenize([LONG, "short"]))


def test_tokenizer_from_folder(tmp_path, open_clip_tokenize):
    # a diffusers folder written by transformers 5 holds only tokenizer.json, whose added tokens
    # include the pad "!": loading it naively would split "!!!" into three tokens.
    load_tokenizer("sd2").save_pretrained(tmp_path / "new")
    shutil.copytree(TOKENIZER_DIR, tmp_path / "old")  # transformers 4 style: vocab.json + merges.txt
    for folder in (tmp_path / "new", tmp_path / "old"):
        assert torch.equal(tokenize(load_tokenizer("sd2", folder), PROMPTS), open_clip_tokenize(PROMPTS))
    with pytest.raises(UserError):
        load_tokenizer("sd1", tmp_path)


# ---------------------------------------------------------------------------------------------------
# SD 1.x: an HF CLIPTextModel stored as is

def tiny_clip(seed=0, **overrides):
    torch.manual_seed(seed)
    kw = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407)
    model = CLIPTextModel(CLIPTextConfig(**{**kw, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def test_sd1_round_trip():
    ref = tiny_clip()
    # an SD 1.x single file: `text_model.` prefix and the position_ids buffer stored
    sd = {"text_model." + k.removeprefix("text_model."): v for k, v in ref.state_dict().items()}
    sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    cfg = text_config_from_state_dict(sd, "sd1")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "max_position_embeddings", "hidden_act"):
        assert getattr(cfg, name) == getattr(ref.config, name), name
    model = CLIPTextModel(cfg).eval()
    model.load_state_dict(match_text_prefix(sd, model), strict=True)
    tok = load_tokenizer("sd1")
    with torch.no_grad():
        ctx = encode_prompt(tok, model, PROMPTS[:3])
        expected = ref(input_ids=tokenize(tok, PROMPTS[:3])).last_hidden_state
    assert ctx.shape == (3, 77, 32)
    assert torch.equal(ctx, expected)  # same weights, same code: bit for bit (no tolerance to condition)


def test_config_helpers():
    assert text_config_from_state_dict(tiny_clip(hidden_size=768, num_attention_heads=12, num_hidden_layers=1,
                                                 intermediate_size=8).state_dict(), "sd1").num_attention_heads == 12
    assert text_config_from_state_dict(tiny_clip().state_dict(), "sd2").hidden_act == "gelu"
    cfg = text_config_from_json({**tiny_clip().config.to_dict(), "_name_or_path": "x", "architectures": ["CLIPTextModel"]})
    assert cfg.hidden_size == 32 and cfg.num_attention_heads == 4 and cfg.hidden_act == "quick_gelu"
    with pytest.raises(UserError):
        text_config_from_state_dict({"foo": torch.zeros(1)}, "sd1")


def test_encode_prompt_uses_model_dtype():
    model = tiny_clip().to(torch.bfloat16)
    with torch.no_grad():
        ctx = encode_prompt(load_tokenizer("sd1"), model, ["a dog"])
    assert ctx.dtype == torch.bfloat16 and ctx.shape == (1, 77, 32)


# ---------------------------------------------------------------------------------------------------
# SD 2.x: OpenCLIP text tower, penultimate layer

class OpenCLIPBlock(nn.Module):
    """open_clip's ResidualAttentionBlock with its parameter names (pre-LN, exact GELU)."""

    def __init__(self, width, heads):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.ModuleDict(dict(c_fc=nn.Linear(width, 4 * width), c_proj=nn.Linear(4 * width, width)))

    def forward(self, x, mask):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x))))


class OpenCLIPText(nn.Module):
    def __init__(self, vocab=49408, width=32, heads=4, layers=3, context=77):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.randn(context, width))
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList([OpenCLIPBlock(width, heads) for _ in range(layers)])
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.randn(width, 16))
        self.logit_scale = nn.Parameter(torch.tensor(4.6))

    def penultimate(self, ids):
        """LDM FrozenOpenCLIPEmbedder(layer="penultimate"): every resblock but the last, then ln_final."""
        x = self.token_embedding(ids) + self.positional_embedding
        mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)  # causal
        for block in self.transformer.resblocks[:-1]:
            x = block(x, mask)
        return self.ln_final(x)


def test_sd2_open_clip_conversion_matches_penultimate():
    torch.manual_seed(0)
    ref = OpenCLIPText().eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    converted = convert_open_clip(ref.state_dict())
    assert not any("resblocks" in k or "projection" in k or "logit" in k for k in converted)
    assert all(k.startswith("text_model.") for k in converted)
    cfg = text_config_from_state_dict(converted, "sd2")  # width 32 -> 4 heads by the rule
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_act) == (2, 4, "gelu")
    model = CLIPTextModel(cfg).eval()
    model.load_state_dict(match_text_prefix(converted, model), strict=True)
    tok = load_tokenizer("sd2")
    ids = tokenize(tok, PROMPTS)
    # 1e-6 relative weight noise moves these states (up to ~3) by 1e-5: a tenth of the tolerance is above that
    assert_well_conditioned("tiny OpenCLIP text tower, penultimate layer", lambda: ref.penultimate(ids), [ref], 1e-3)
    with torch.no_grad():
        diff = (encode_prompt(tok, model, PROMPTS) - ref.penultimate(ids)).abs().max()
    assert diff <= 1e-3, diff


def test_open_clip_unexpected_key():
    sd = OpenCLIPText(layers=2).state_dict()
    sd["transformer.resblocks.0.ls_1.gamma"] = torch.ones(32)
    with pytest.raises(UserError):
        convert_open_clip(sd)
