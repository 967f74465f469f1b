"""--pivotal: new tokens initialised from the class noun and trained with their own lr, every old row of the token
table bit-identical, the embedding file (A1111 / ComfyUI layout) apart from the LoRA, sample.py --embedding, resume,
and diffusers' load_textual_inversion giving our image."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from dreambooth_min import load
from dreambooth_min.errors import UserError
from dreambooth_min.formats.embedding_file import load_embedding, save_embedding
from dreambooth_min.formats.lora_file import load_lora
from dreambooth_min.run import pivotal
from dreambooth_min.run.config import TrainConfig
from dreambooth_min.run.training import train
from test_training import config


# ---------------------------------------------------------------------------------------------------
# The wrapped token table


def test_old_ids_read_the_frozen_table_and_new_ids_the_trained_rows():
    table = torch.nn.Embedding(10, 4)
    vectors = torch.randn(2, 4)
    wrapped = pivotal.NewTokenEmbedding(table, vectors)
    ids = torch.tensor([[0, 9, 10, 3, 11]])
    out = wrapped(ids)
    assert torch.equal(out[0, [0, 1, 3]], table.weight[[0, 9, 3]])
    assert torch.equal(out[0, [2, 4]], vectors)
    out.sum().backward()
    assert table.weight.grad is None and [p.shape for p in wrapped.parameters() if p.requires_grad] == [(2, 4)]
    torch.testing.assert_close(wrapped.vectors.grad, torch.ones(2, 4))
    wrapped.half()
    assert wrapped.vectors.dtype == torch.float32 and wrapped.table.weight.dtype == torch.float16


@pytest.mark.parametrize("token,prompt,problem", [
    ("<s0><s1>", "a photo of <s0><s1> dog", None),
    ("sks", "a photo of sks dog", "must be new tokens written as <name>"),
    ("<s0> <s1>", "a photo of <s0> <s1> dog", "must be new tokens written as <name>"),
    ("<|endoftext|>", "a photo of <|endoftext|>", "must be new tokens written as <name>"),
    ("<s0><S0>", "a photo of <s0><S0> dog", "repeats a token"),
    ("<s0><s1>", "a photo of sks dog", "is not in the instance prompt")])
def test_token_checks(token, prompt, problem):
    found = pivotal.check_tokens(token, prompt)
    assert found is None if problem is None else problem in found


def test_the_prompt_uses_the_new_tokens():
    assert TrainConfig(class_noun="dog").resolved_prompts()[0] == "a photo of sks dog"
    prompt, class_prompt, validation = TrainConfig(class_noun="dog", pivotal=True).resolved_prompts()
    assert (prompt, class_prompt, validation) == ("a photo of <s0><s1> dog", "a photo of dog",
                                                  "a photo of <s0><s1> dog in the snow")
    assert TrainConfig(class_noun="dog", pivotal=True, token="<cat-1>").resolved_prompts()[0] == "a photo of <cat-1> dog"
    with pytest.raises(UserError, match="token .* is not in the instance prompt"):
        TrainConfig(images="x", pivotal=True, prompt="a photo of sks dog").check()


# ---------------------------------------------------------------------------------------------------
# Training


def _after_names(state):
    """The text encoder's tensors under their names before any wrapping (".table", ".base" dropped), without the
    new rows and the LoRA factors (the text-encoder LoRA is added before the tokens)."""
    return {k.replace(".table", "").replace(".base", ""): v for k, v in state.items()
            if not k.endswith("vectors") and "lora_" not in k}


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_only_the_new_rows_change(train_text_encoder, tiny_sd1, tmp_path, monkeypatch):
    seen, start = {}, pivotal.start

    def spy(cfg, sd, captions, log):  # the model train() loads, before and after the tokens are added
        seen["sd"], seen["before"] = sd, {k: v.clone() for k, v in _after_names(sd.text_encoder.state_dict()).items()}
        tokens = start(cfg, sd, captions, log)
        seen["init"] = tokens.vectors()["clip_l"]
        return tokens

    monkeypatch.setattr(pivotal, "start", spy)
    lines = []
    r = train(config(tmp_path, tiny_sd1["single"], pivotal=True, steps=4, lr=1e-3, embedding_lr=5e-3, prior_weight=0.0,
                     train_text_encoder=train_text_encoder), log=lines.append)
    assert "pivotal     new tokens <s0><s1>, initialised from 'dog', lr 0.005" in lines[0]
    sd, before = seen["sd"], seen["before"]
    dog = sd.tokenizer("dog", add_special_tokens=False).input_ids
    assert len(dog) == 1  # one token: each new vector starts as exactly its row
    assert torch.equal(seen["init"], before["embeddings.token_embedding.weight"][dog].expand(2, -1))
    after = _after_names(sd.text_encoder.state_dict())
    assert after.keys() == before.keys()
    for k in before:  # all 49408 old rows of the table, and every other tensor of the encoder, bit-identical
        assert torch.equal(after[k], before[k]), k
    vectors, tokens, meta = load_embedding(r["output"] / "embedding.safetensors")
    assert tokens == "<s0><s1>" and list(vectors) == ["emb_params"] and vectors["emb_params"].shape == (2, 32)
    moved = (vectors["emb_params"] - seen["init"]).abs().max().item()
    assert 4 * 5e-3 * 0.5 < moved <= 4 * 5e-3 * 1.01  # Adam moves a coordinate by about lr a step: its own lr
    assert torch.equal(vectors["emb_params"], sd.text_encoder.get_input_embeddings().vectors.detach())
    assert meta["initialised_from"] == "dog" and meta["steps"] == "4"
    lora, lora_meta = load_lora(r["lora"])
    assert not any("emb" in k or "token" in k for k in lora)  # the LoRA file holds no token keys
    assert lora_meta["ss_instance_prompt"] == "a photo of <s0><s1> dog"


def test_resume_gives_the_same_lora_and_embedding(tiny_sd1, tmp_path):
    settings = dict(pivotal=True, steps=6, lr=1e-3, train_text_encoder=True, token="<x1><x2><x3>", class_noun="toy dog")
    a = train(config(tmp_path / "a", tiny_sd1["single"], **settings), log=lambda *_: None)
    cfg = config(tmp_path / "b", tiny_sd1["single"], class_dir=str(tmp_path / "a" / "class"), **settings)
    assert train(cfg, stop_after=3, log=lambda *_: None)["interrupted"]
    b = train(cfg, resume=True, log=lambda *_: None)
    assert Path(a["lora"]).read_bytes() == Path(b["lora"]).read_bytes()
    emb = "embedding.safetensors"
    assert (a["output"] / emb).read_bytes() == (b["output"] / emb).read_bytes()
    assert load_embedding(a["output"] / emb)[0]["emb_params"].shape == (3, 32)


# ---------------------------------------------------------------------------------------------------
# Sampling with the embedding file


def _pixels(path):
    return np.asarray(Image.open(path)).astype(int)


def test_sample_with_the_embedding_reproduces_the_trained_model(tiny_sd1, tmp_path):
    # lr 1e-3: at 1e-2 this tiny model becomes chaotic (a LoRA-only run then differs by 11/255 between sampling
    # paths that differ only in rounding); the embedding gets 5e-3 of its own, so that it matters.
    cfg = config(tmp_path, tiny_sd1["single"], pivotal=True, steps=6, lr=1e-3, embedding_lr=5e-3, prior_weight=0.0,
                 train_text_encoder=True, validate_every=2, validation_images=1, validation_steps=5)
    r = train(cfg, log=lambda *_: None)
    trained = r["output"] / "samples" / "epoch_0002" / "0.png"  # drawn by the model in memory after step 6
    out = tmp_path / "out.png"
    args = ["--model", str(tiny_sd1["single"]), "--prompt", "a photo of <s0><s1> dog in the snow", "--steps", "5",
            "--guidance", "7.5", "--seed", "3", "--height", "32", "--width", "32", "--no-progress",
            "--lora", str(r["lora"]), "--out", str(out)]
    assert sample.main(args + ["--embedding", str(r["output"] / "embedding.safetensors")]) == 0
    diff = np.abs(_pixels(out) - _pixels(trained))
    print(f"sample.py --embedding vs the trained model: max |diff| {diff.max()}/255")
    assert diff.max() <= 1 and _pixels(trained).std() > 20
    assert sample.main(args) == 0  # without the file "<s0><s1>" is plain text: another image
    assert np.abs(_pixels(out) - _pixels(trained)).max() > 10


def test_diffusers_load_textual_inversion_gives_our_image(tmp_path):
    """Our file read by diffusers as A1111 users load one (a single tensor, the token named at load time), with
    our LoRA fused: the image equals sample.py's within 1/255."""
    pytest.importorskip("peft")
    from tiny import make_pipeline, save_folder

    pipe = make_pipeline("sd1")  # our own copy: loading changes the pipeline
    model = save_folder(pipe, tmp_path / "model")
    r = train(config(tmp_path, model, pivotal=True, steps=4, lr=1e-3, embedding_lr=5e-3, prior_weight=0.0,
                     train_text_encoder=True), log=lambda *_: None)
    emb = r["output"] / "embedding.safetensors"
    ours = tmp_path / "ours.png"
    common = ["--model", str(model), "--steps", "5", "--seed", "1", "--height", "32", "--width", "32", "--no-progress"]
    assert sample.main(common + ["--prompt", "a photo of <s0><s1> dog", "--lora", str(r["lora"]), "--embedding",
                                 str(emb), "--out", str(ours)]) == 0
    pipe.load_lora_weights(str(r["output"]), weight_name="lora.safetensors")
    pipe.fuse_lora()
    pipe.load_textual_inversion(str(emb), token="sksemb")  # two vectors: sksemb, sksemb_1
    ref = pipe("a photo of sksemb dog", num_inference_steps=5, guidance_scale=7.5, height=32, width=32,
               output_type="np", generator=torch.Generator().manual_seed(1)).images
    ref = (ref[0] * 255).round().astype(int)
    diff = np.abs(_pixels(ours) - ref)
    print(f"diffusers load_textual_inversion + load_lora_weights vs ours: max |diff| {diff.max()}/255")
    assert diff.max() <= 1 and ref.std() > 20
    # Well-conditioned: moving the vectors by 1e-6 moves our image by at most 1/255.
    vectors, tokens, meta = load_embedding(emb)
    save_embedding(tmp_path / "nudged.safetensors", {"clip_l": vectors["emb_params"] + 1e-6}, tokens)
    nudged = tmp_path / "nudged.png"
    assert sample.main(common + ["--prompt", "a photo of <s0><s1> dog", "--lora", str(r["lora"]), "--embedding",
                                 str(tmp_path / "nudged.safetensors"), "--out", str(nudged)]) == 0
    assert np.abs(_pixels(nudged) - _pixels(ours)).max() <= 1


def test_sdxl_layout_and_bad_files_are_one_line(tiny_sd1, tmp_path, capsys):
    v = torch.randn(2, 32)
    save_embedding(tmp_path / "xl.safetensors", {"clip_l": v, "clip_g": torch.randn(2, 64)}, "<s0><s1>")
    vectors, tokens, _ = load_embedding(tmp_path / "xl.safetensors")
    assert sorted(vectors) == ["clip_g", "clip_l"] and torch.equal(vectors["clip_l"], v)
    save_embedding(tmp_path / "wide.safetensors", {"clip_h": torch.randn(2, 64)}, "<s0><s1>")
    from safetensors.torch import save_file
    save_file({"emb_params": v}, str(tmp_path / "a1111.safetensors"))  # no token list: not ours
    common = ["--model", str(tiny_sd1["single"]), "--prompt", "<s0><s1>", "--steps", "2", "--height", "32",
              "--width", "32", "--no-progress", "--out", str(tmp_path / "o.png"), "--embedding"]
    for name, message in (("xl", "is an SDXL embedding"), ("wide", "this text encoder needs [2, 32]"),
                          ("a1111", "does not say which tokens"), ("missing", "does not exist")):
        assert sample.main(common + [str(tmp_path / f"{name}.safetensors")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and message in err and "\n" not in err, err


def test_sd2_vectors_round_trip_through_the_file(tiny_sd2, tmp_path):
    sd = load(tiny_sd2["single"])
    cfg = TrainConfig(class_noun="dog", pivotal=True)
    tokens = pivotal.start(cfg, sd, ["a photo of <s0><s1> dog"], log=print)
    with torch.no_grad():
        tokens.tables["clip_h"].vectors.add_(torch.linspace(-0.1, 0.1, 64))  # as if trained
    pivotal.save(tmp_path / "e.safetensors", tokens, cfg, sd, step=0)
    prompts = ["a photo of <s0><s1> dog", "a photo of dog !!"]  # SD 2.x pads with "!": plain prompts unchanged
    with torch.no_grad():
        trained = sd.encode_prompt(prompts).context
        fresh = load(tiny_sd2["single"])
        plain = fresh.encode_prompt(prompts[1:]).context
        assert pivotal.use_embedding(fresh, tmp_path / "e.safetensors") == "<s0><s1>"
        assert torch.equal(fresh.encode_prompt(prompts).context, trained) and torch.equal(trained[1:], plain)
    vectors, _, meta = load_embedding(tmp_path / "e.safetensors")
    assert list(vectors) == ["emb_params"] and vectors["emb_params"].shape == (2, 64) and meta["encoders"] == "clip_h"


def test_fp16_path_keeps_the_new_rows_in_fp32(tiny_sd1, tmp_path):
    """--precision fp16 (the CUDA path, here on the CPU): fp16 table, fp32 trained rows, finite after GradScaler."""
    r = train(config(tmp_path, tiny_sd1["single"], pivotal=True, steps=2, lr=1e-3, prior_weight=0.0, precision="fp16"),
              log=lambda *_: None)
    vectors, _, _ = load_embedding(r["output"] / "embedding.safetensors")
    assert torch.isfinite(vectors["emb_params"]).all() and vectors["emb_params"].shape == (2, 32)
    sd = load(tiny_sd1["single"])
    dog = sd.text_encoder.get_input_embeddings().weight[sd.tokenizer("dog", add_special_tokens=False).input_ids]
    assert (vectors["emb_params"] - dog.float()).abs().max() > 5e-4  # a step was taken (Adam: ~lr a step)
