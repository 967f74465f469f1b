"""Pivotal tuning (--pivotal): new tokens whose embeddings are learnt together with the LoRA.

Textual inversion (Gal et al. 2023, eq. 2) learns the embedding v of a new token S* with the model frozen:
    v* = argmin_v E_{z, y, eps, t} || eps - eps_theta(z_t, t, c_theta(y)) ||^2,   every prompt y containing S*.
Pivotal tuning learns v and the LoRA together, on DreamBooth's loss (eq. 2), as diffusers' advanced DreamBooth
script does. The identifier is then a word of its own instead of a rare existing one ("sks" is also a rifle),
and the embedding file carries it to other UIs (embedding_file.py).

Only the new rows are parameters. The text encoder's token table is wrapped (NewTokenEmbedding): ids below the
old vocabulary size read the frozen table, the new ids read the trained vectors, so every old row stays
bit-identical, with or without --train-text-encoder (whose LoRA is on the attention only).

Initialisation: every new vector starts as the class noun's embedding (the mean of its tokens' rows when the
noun is several tokens). diffusers' script draws random vectors scaled to the table's std; others start from a
chosen word. Starting from the noun puts the identifier where the class already is: "a photo of <s0><s1> dog"
begins as "a photo of dog dog dog", and the first steps refine the subject instead of searching for the class.
(That is the intent; in the toy world, one seed, random initialisation did better: docs/prodigy-and-pivotal.md.)
"""
import re

import torch
import torch.nn as nn

from ..errors import UserError
from ..formats.embedding_file import SDXL_KEYS, load_embedding, save_embedding

TOKEN = re.compile(r"<[^<>|\s]+>")  # <s0>; not <|endoftext|>, CLIP's own special tokens


def split_tokens(text):
    """["<s0>", "<s1>"] for "<s0><s1>"; None when `text` is not made of <name> tokens only."""
    tokens = TOKEN.findall(text or "")
    return tokens if tokens and "".join(tokens) == text else None


def check_tokens(token_text, prompt):
    """Why `token_text` cannot be pivotal tuning's new tokens in `prompt` (a few words), or None."""
    tokens = split_tokens(token_text)
    if not tokens:
        return f"must be new tokens written as <name>, e.g. <s0><s1>, with --pivotal, not {token_text!r}"
    if len({t.lower() for t in tokens}) != len(tokens):  # the tokenizer lower-cases: <S0> is <s0>
        return f"repeats a token: {token_text!r}"
    if token_text not in prompt:
        return f"{token_text!r} is not in the instance prompt {prompt!r}: write {{token}} in --prompt"
    return None


class NewTokenEmbedding(nn.Module):
    """A frozen token table and trainable rows after it: id < len(table) reads the table, id >= it reads
    vectors[id - len(table)]. The vectors stay fp32 (trained like the LoRA factors) whatever the table's dtype."""

    def __init__(self, table, vectors):
        super().__init__()
        self.table = table.requires_grad_(False)  # registered first: the encoder's first parameter is its dtype
        self.vectors = nn.Parameter(vectors.detach().to(table.weight.device, torch.float32).clone())

    def forward(self, ids):
        n_old = self.table.num_embeddings
        old = self.table(ids.clamp(max=n_old - 1))
        new = self.vectors.to(old.dtype)[(ids - n_old).clamp(min=0)]
        return torch.where((ids >= n_old)[..., None], new, old)

    def extend(self, vectors):
        """More new rows after these (a second embedding file)."""
        self.vectors = nn.Parameter(torch.cat([self.vectors.detach(), vectors.to(self.vectors)]))

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)  # .half() of the encoder halves the table, not the trained rows
        if self.vectors.dtype != torch.float32:
            self.vectors.data = self.vectors.data.float()
        return self


def text_encoders(sd):
    """[(file key, tokenizer, text encoder)]: SD 1.x's CLIP ViT-L is clip_l, SD 2.x's OpenCLIP ViT-H clip_h;
    a model with a second encoder (SDXL: `tokenizer_2`, `text_encoder_2`, OpenCLIP ViT-bigG) adds clip_g."""
    pairs = [("clip_h" if sd.version == "sd2" else "clip_l", sd.tokenizer, sd.text_encoder)]
    if getattr(sd, "text_encoder_2", None) is not None:
        pairs.append(("clip_g", getattr(sd, "tokenizer_2", sd.tokenizer), sd.text_encoder_2))
    return pairs


def _table(text_encoder):
    return text_encoder.get_input_embeddings()  # transformers' accessor: its module path differs between versions


def add_tokens(tokenizer, text_encoder, tokens, vectors):
    """Add `tokens` to the tokenizer (unless already added, for a tokenizer two encoders share) and `vectors`
    [len(tokens), width] as the encoder's rows for their ids; returns the encoder's NewTokenEmbedding."""
    table = _table(text_encoder)
    wrapped = isinstance(table, NewTokenEmbedding)
    n_rows = table.table.num_embeddings + len(table.vectors) if wrapped else table.num_embeddings
    width = table.table.embedding_dim if wrapped else table.embedding_dim
    if vectors.shape != (len(tokens), width):
        raise UserError(f"the embedding of {''.join(tokens)} is {list(vectors.shape)}, this text encoder needs "
                        f"[{len(tokens)}, {width}]: was it made for another model family?")
    vocab = tokenizer.get_vocab()
    shared = all(t in vocab for t in tokens) and tokenizer.convert_tokens_to_ids(tokens)[0] == n_rows
    if not shared:
        clash = [t for t in tokens if t.lower() in vocab or t in vocab]
        if clash:
            raise UserError(f"{', '.join(clash)} is already a token of this model: choose another --token")
        if len(tokenizer) != n_rows:
            raise UserError(f"the tokenizer has {len(tokenizer)} tokens and the text encoder {n_rows} rows: "
                            "new tokens would get the wrong rows")
        tokenizer.add_tokens(list(tokens))
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    assert ids == list(range(n_rows, n_rows + len(tokens))), ids  # row = id - old vocabulary size
    if wrapped:
        table.extend(vectors)
        return table
    text_encoder.set_input_embeddings(NewTokenEmbedding(table, vectors))
    return _table(text_encoder)


def noun_vector(tokenizer, text_encoder, noun):
    """The embedding of the word `noun`: its token's row, or the mean of its tokens' rows."""
    ids = tokenizer(noun.strip().lower(), add_special_tokens=False).input_ids
    if not ids:
        raise UserError(f"the class noun {noun!r} has no tokens to initialise the new embeddings from")
    table = _table(text_encoder)
    weight = table.table.weight if isinstance(table, NewTokenEmbedding) else table.weight
    return weight.detach()[ids].float().mean(0)


class PivotalTokens:
    """The new tokens of a training run and, per text encoder, their trained rows."""

    def __init__(self, text, tables):
        self.text, self.tokens, self.tables = text, split_tokens(text), tables  # tables: {file key: NewTokenEmbedding}

    def parameters(self):
        return [table.vectors for table in self.tables.values()]

    def vectors(self):
        """{file key: [n, width]} on the CPU in fp32: what the embedding file and a checkpoint hold."""
        return {key: table.vectors.detach().to("cpu", torch.float32).clone() for key, table in self.tables.items()}

    @torch.no_grad()
    def load(self, vectors, where):
        for key, table in self.tables.items():
            saved = vectors.get(key)
            if saved is None or saved.shape != table.vectors.shape:
                raise UserError(f"checkpoint {where} does not fit these new tokens ({key}): was --token changed?")
            table.vectors.copy_(saved)


def start(cfg, sd, captions, log):
    """Add the run's new tokens to every text encoder, each vector initialised from the class noun's."""
    text = cfg.resolved_token()
    tokens, tables = split_tokens(text), {}
    for key, tokenizer, encoder in text_encoders(sd):
        init = noun_vector(tokenizer, encoder, cfg.class_noun)
        tables[key] = add_tokens(tokenizer, encoder, tokens, init.expand(len(tokens), -1))
    missing = sum(text not in caption for caption in captions)
    if missing:
        log(f"warning: {missing} of {len(captions)} captions do not contain {text}: those photos teach the LoRA "
            "but not the new embeddings")
    return PivotalTokens(text, tables)


def embedding_path(run_path):
    return run_path / "embedding.safetensors"


def save(path, pivotal, cfg, sd, step):
    """The run's embedding file (embedding_file.py): the vectors, their tokens and how they were made."""
    save_embedding(path, pivotal.vectors(), pivotal.text, {
        "base_model": sd.name, "sd_version": sd.version, "class_noun": cfg.class_noun,
        "initialised_from": cfg.class_noun, "steps": step, "training_tool": "dreambooth_min"})


def use_embedding(sd, path):
    """Load an embedding file into the model (sample.py --embedding); returns the tokens to write in prompts."""
    vectors, text, _ = load_embedding(path)
    tokens = split_tokens(text)
    if not tokens:
        raise UserError(f"{path} does not say which tokens it was trained under (no 'tokens' in its metadata; "
                        "train.py --pivotal writes them)")
    encoders = text_encoders(sd)
    if len(encoders) == 1 and set(SDXL_KEYS) <= set(vectors):
        raise UserError(f"{path} is an SDXL embedding (clip_l and clip_g); this model has one text encoder")
    for key, tokenizer, encoder in encoders:
        v = vectors[key] if len(encoders) > 1 else next(iter(vectors.values()))
        if v.shape[0] != len(tokens):
            raise UserError(f"{path} has {v.shape[0]} vectors for the {len(tokens)} tokens {text}")
        add_tokens(tokenizer, encoder, tokens, v)
    return text
