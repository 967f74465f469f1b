"""Evaluation (DreamBooth sec. 4.1): metric math against hand computations, embeddings against
transformers' own CLIP / ViT on tiny random models saved with save_pretrained, the best-epoch rule, a
fake run folder, the CLI."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import dreambooth_min
from dreambooth_min.errors import UserError
from dreambooth_min.watch import evaluation as ev, evaluators, finished_run, preprocess as pre
from dreambooth_min.watch.eval_prompts import LIVE_PROMPTS, OBJECT_PROMPTS, is_live, prompts_for

from conditioning import assert_well_conditioned

TOKENIZER_DIR = Path(dreambooth_min.__file__).parent / "tokenizer"
CLIP_PRE = {"size": {"shortest_edge": 40}, "crop_size": {"height": 32, "width": 32},
            "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3]}


# ---------------------------------------------------------------------------------------------------
# Tiny evaluator models

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Folders of a tiny random CLIPModel (with tokenizer and a preprocessor config) and a ViT (DINO's
    architecture, without one), as save_pretrained writes them."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, ViTConfig, ViTModel

    root = tmp_path_factory.mktemp("evaluators")
    torch.manual_seed(0)
    layers = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    clip = CLIPModel(CLIPConfig(
        text_config=dict(layers, vocab_size=49408, max_position_embeddings=77, bos_token_id=49406,
                         eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(layers, image_size=32, patch_size=8), projection_dim=16)).eval()
    clip.save_pretrained(root / "clip")
    CLIPTokenizer(str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"),
                  model_max_length=77).save_pretrained(root / "clip")
    (root / "clip" / "preprocessor_config.json").write_text(json.dumps(CLIP_PRE))
    vit = ViTModel(ViTConfig(**layers, image_size=32, patch_size=8), add_pooling_layer=False).eval()
    vit.save_pretrained(root / "dino")
    loaded = evaluators.load_evaluators(str(root / "clip"), str(root / "dino"), "cpu", batch_size=2, progress=False)
    return dict(clip=clip, vit=vit, clip_dir=root / "clip", dino_dir=root / "dino", ev=loaded)


def _images(n, seed=0, size=(40, 48)):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def _save(images, folder, prefix=""):
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        im.save(folder / f"{prefix}{i}.png")
    return folder


# ---------------------------------------------------------------------------------------------------
# Metric math

def _cos(u, v):
    return float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)))


def test_metric_functions_match_hand_computation():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 6, generator=g), torch.randn(3, 6, generator=g) + 0.5
    A, B = a.double().numpy(), b.double().numpy()
    pairs = [_cos(x, y) for x in A for y in B]
    within = [_cos(A[i], A[j]) for i in range(4) for j in range(4) if i != j]
    assert ev.mean_pairwise_cosine(a, b) == pytest.approx(np.mean(pairs), abs=1e-6)
    assert ev.dino_score(a, b) == ev.clip_i_score(a, b) == ev.pres_score(a, b) == ev.mean_pairwise_cosine(a, b)
    assert ev.mean_cosine_within(a) == pytest.approx(np.mean(within), abs=1e-6)
    assert ev.div_score(a) == pytest.approx(1 - np.mean(within), abs=1e-6)
    assert ev.nearest_real_score(a, b) == pytest.approx(np.mean([max(_cos(x, y) for y in B) for x in A]), abs=1e-6)
    t = torch.randn(1, 6, generator=g)
    assert ev.clip_t_score(a, t) == pytest.approx(np.mean([_cos(x, t[0].numpy()) for x in A]), abs=1e-6)
    t4 = torch.randn(4, 6, generator=g)
    assert ev.clip_t_score(a, t4) == pytest.approx(np.mean([_cos(x, y) for x, y in zip(A, t4.numpy())]), abs=1e-6)
    # scale-free, fp32 even for half inputs, and a set against itself: 1 only on the diagonal
    assert ev.mean_pairwise_cosine(3 * a, b.half()) == pytest.approx(ev.mean_pairwise_cosine(a, b), abs=1e-3)
    assert ev.mean_pairwise_cosine(a, a) == pytest.approx((1 + 3 * ev.mean_cosine_within(a)) / 4, abs=1e-6)
    assert ev.mean_pairwise_cosine(a[:1], a[:1]) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError):
        ev.mean_cosine_within(a[:1])
    with pytest.raises(ValueError):
        ev.clip_t_score(a, torch.randn(2, 6))


def test_best_epoch_rule_on_hand_made_table(tmp_path):
    table = [dict(epoch=0, step=0, dino=0.30, clip_t=0.310),
             dict(epoch=50, step=250, dino=0.55, clip_t=0.318),   # best CLIP-T
             dict(epoch=100, step=500, dino=0.62, clip_t=0.309),  # within 0.01 of 0.318: allowed
             dict(epoch=150, step=750, dino=0.71, clip_t=0.300),  # highest DINO, but copying: 0.018 lost
             dict(epoch=200, step=1000, dino=0.62, clip_t=0.312)]  # ties with epoch 100: the earlier wins
    assert ev.best_epoch(table)["epoch"] == 100
    assert ev.best_epoch(table, margin=0.02)["epoch"] == 150
    assert ev.best_epoch(table, margin=0.0)["epoch"] == 50
    assert ev.best_epoch([dict(epoch=0, dino=float("nan"), clip_t=0.3)]) is None
    # the nearest saved LoRA: checkpoints and the final file (at the last logged step); ties go earlier
    for s in (250, 750):
        (tmp_path / "checkpoints" / f"step_{s:06d}").mkdir(parents=True)
    assert finished_run.nearest_checkpoint(tmp_path, 500) == (tmp_path / "checkpoints" / "step_000250", 250)
    assert finished_run.nearest_checkpoint(tmp_path, 600)[1] == 750
    (tmp_path / "lora.safetensors").write_bytes(b"x")
    (tmp_path / "log.jsonl").write_text("".join(json.dumps({"step": s, "epoch": s / 5, "loss": 0.1}) + "\n"
                                                for s in range(1, 1001)))
    assert finished_run.nearest_checkpoint(tmp_path, 950) == (tmp_path / "lora.safetensors", 1000)
    assert finished_run.nearest_checkpoint(tmp_path / "none", 0) is None


def test_preprocess_resize_crop_normalise():
    spec = pre.image_spec(CLIP_PRE, 32, evaluators.CLIP_MEAN, evaluators.CLIP_STD)
    assert spec == pre.ImageSpec(40, 32, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    assert pre.image_spec(None, 224, evaluators.IMAGENET_MEAN, evaluators.IMAGENET_STD) == \
        pre.ImageSpec(224, 224, evaluators.IMAGENET_MEAN, evaluators.IMAGENET_STD)
    # a flat colour stays flat: (c / 255 - mean) / std exactly, whatever the resampling
    x = pre.preprocess([Image.new("RGB", (80, 50), (255, 51, 102))], spec)
    assert x.shape == (1, 3, 32, 32) and x.dtype == torch.float32
    want = (torch.tensor([1.0, 0.2, 0.4]) - torch.tensor(spec.mean)) / torch.tensor(spec.std)
    assert torch.allclose(x[0].mean(dim=(1, 2)), want, atol=1e-5) and x.std(dim=(2, 3)).max() < 1e-5
    # the crop is centred: of a 120x40 image (short side already 40: no resampling) it keeps rows 4..35
    # and columns 44..75, exactly the white box; one pixel off and a black row or column comes in
    arr = np.zeros((40, 120, 3), dtype=np.uint8)
    arr[4:36, 44:76] = 255
    y = pre.preprocess([Image.fromarray(arr)], spec)[0] * torch.tensor(spec.std).view(3, 1, 1) + \
        torch.tensor(spec.mean).view(3, 1, 1)
    assert torch.allclose(y, torch.ones(3, 32, 32), atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Embeddings and scores with the tiny models

def test_embeddings_match_transformers(models):
    e, imgs = models["ev"], _images(3)
    assert e.clip_spec == pre.ImageSpec(40, 32, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    assert e.dino_spec == pre.ImageSpec(32, 32, evaluators.IMAGENET_MEAN, evaluators.IMAGENET_STD)  # no preprocessor config
    px_clip, px_dino = pre.preprocess(imgs, e.clip_spec), pre.preprocess(imgs, e.dino_spec)

    def reference():
        feats = models["clip"].get_image_features(pixel_values=px_clip)
        feats = getattr(feats, "pooler_output", feats)  # transformers 5 returns an output object
        return feats, models["vit"](pixel_values=px_dino).last_hidden_state[:, 0]

    # 1e-6 relative weight noise moves these embeddings by ~4e-6: a tenth of the tolerance stays above that
    assert_well_conditioned("tiny CLIP and ViT image embeddings", reference, [models["clip"], models["vit"]], 1e-4)
    with torch.no_grad():
        feats, cls = reference()
    assert (evaluators.clip_image_embeddings(e, imgs) - feats).abs().max() <= 1e-4
    assert (evaluators.dino_embeddings(e, imgs) - cls).abs().max() <= 1e-4  # batch_size 2: batches of 2 and 1


def test_clip_t_is_the_cosine_of_text_and_image_projections(models):
    from transformers import CLIPTokenizer

    e, imgs, prompt = models["ev"], _images(2, seed=3), "a photo of sks dog in the snow"
    tok = CLIPTokenizer.from_pretrained(models["clip_dir"])
    ids = tok([prompt], padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        text = models["clip"].get_text_features(**ids)
        text = getattr(text, "pooler_output", text)[0].double().numpy()
        image = models["clip"].get_image_features(pixel_values=pre.preprocess(imgs, e.clip_spec))
        image = getattr(image, "pooler_output", image).double().numpy()
    scores = evaluators.evaluate_epoch(e, imgs, imgs, prompt)
    assert scores["clip_t"] == pytest.approx(np.mean([_cos(text, v) for v in image]), abs=1e-5)


def test_identical_sets_score_one(models, tmp_path):
    e, imgs = models["ev"], _images(3, seed=5)
    one = evaluators.evaluate_epoch(e, imgs[:1], imgs[:1], "a photo of sks dog")
    assert one["dino"] == pytest.approx(1.0, abs=1e-5) and one["clip_i"] == pytest.approx(1.0, abs=1e-5)
    copies = evaluators.evaluate_epoch(e, [imgs[0]] * 3, [imgs[0]] * 2, "x")
    assert copies["dino"] == pytest.approx(1.0, abs=1e-5) and copies["clip_i"] == pytest.approx(1.0, abs=1e-5)
    assert copies["div"] == pytest.approx(0.0, abs=1e-5)
    # distinct photos against themselves: the paper's all-pairs mean, below 1; the nearest-photo score is 1
    same = evaluators.evaluate_epoch(e, imgs, imgs, "x")
    d = evaluators.dino_embeddings(e, imgs)
    assert same["dino"] == pytest.approx((1 + 2 * ev.mean_cosine_within(d)) / 3, abs=1e-5) and same["dino"] < 1
    assert same["dino_nn"] == pytest.approx(1.0, abs=1e-5)
    # and through the folder CLI, with the files on disk
    real, gen = _save(imgs[:1], tmp_path / "real"), _save(imgs[:1], tmp_path / "gen")
    out = _cli(["--real", str(real), "--generated", str(gen), "--prompt", "p"], models)
    assert json.loads(out)["dino"] == pytest.approx(1.0, abs=1e-5)
    assert json.loads(out)["clip_i"] == pytest.approx(1.0, abs=1e-5)


def test_pres_and_div_by_prompt(models):
    e = models["ev"]
    real, gen, cls = _images(2, seed=7), _images(4, seed=8), _images(2, seed=9)
    s = evaluators.evaluate_epoch(e, real, gen, ["p1", "p1", "p2", "p2"], class_images=cls)
    dr, dg, dc = evaluators.dino_embeddings(e, real), evaluators.dino_embeddings(e, gen), evaluators.dino_embeddings(e, cls)
    assert s["pres"] == pytest.approx(ev.mean_pairwise_cosine(dc, dr), abs=1e-6)
    assert s["div"] == pytest.approx((ev.div_score(dg[:2]) + ev.div_score(dg[2:])) / 2, abs=1e-6)
    single = evaluators.evaluate_epoch(e, real, gen[:1], "p")
    assert "div" not in single and "pres" not in single


# ---------------------------------------------------------------------------------------------------
# Run folder and CLI

def _cli(argv, models, capsys=None):
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = evaluate.main(argv + ["--clip-model", str(models["clip_dir"]), "--dino-model", str(models["dino_dir"]),
                                   "--device", "cpu", "--no-progress"])
    assert rc == 0
    text = buf.getvalue()
    return text[:text.rindex("}") + 1] if "}" in text else text


def _fake_run(root, epochs=(0, 2, 4), with_class=True):
    photos = _save(_images(3, seed=11), root / "photos")
    run = root / "run"
    (run / "samples").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({
        "config": {"images": str(photos), "class_noun": "dog", "validation_prompt": "{prompt} in the snow"},
        "resolved": {"prompt": "a photo of sks dog", "class_prompt": "a photo of dog",
                     "validation_prompt": "a photo of sks dog in the snow", "resolution": 64}}))
    (run / "log.jsonl").write_text("".join(json.dumps({"step": s, "epoch": s / 3, "loss": 1 / s}) + "\n"
                                           for s in range(1, 13)))
    for k, epoch in enumerate(epochs):
        folder = _save(_images(2, seed=20 + k, size=(64, 64)), run / "samples" / f"epoch_{epoch:04d}")
        if with_class:
            _save(_images(2, seed=40 + k, size=(64, 64)), folder, "class_")
    (run / "samples" / "epoch_0006").mkdir()  # empty: not a validation epoch
    (run / "checkpoints" / "step_000006").mkdir(parents=True)
    return run


def test_run_folder_mode(models, tmp_path, capsys):
    run = _fake_run(tmp_path)
    out = _cli([str(run)], models)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["epoch"] for r in records] == [0, 2, 4] and [r["step"] for r in records] == [0, 6, 12]
    for r in records:
        assert {"dino", "clip_i", "clip_t", "pres", "div", "dino_nn"} <= r.keys()
        assert all(-1 <= r[k] <= 1 for k in ("dino", "clip_i", "clip_t", "pres", "dino_nn")) and 0 <= r["div"] <= 2
    # the numbers are those of the library on the same images
    e = models["ev"]
    real = pre.read_images(tmp_path / "photos")
    gen = pre.read_images(run / "samples" / "epoch_0002")
    want = evaluators.evaluate_epoch(e, real, [gen[0], gen[1]], "a photo of sks dog in the snow", [gen[2], gen[3]])
    assert records[1]["dino"] == pytest.approx(want["dino"], abs=1e-5)  # by name: 0, 1, class_0, class_1
    assert records[1]["pres"] == pytest.approx(want["pres"], abs=1e-5)
    best = ev.best_epoch(records)
    assert f"best epoch: {best['epoch']} (step {best['step']})" in out
    assert "step_000006" in out or "lora.safetensors" in out
    with Image.open(run / "metrics.png") as im:
        assert im.size == (900, 820)
    page = (run / "report.html").read_text()  # refreshed: the metrics table, the best epoch's row marked
    assert '<table class="metrics">' in page and f'<tr class="best"><td>{best["epoch"]} (best)</td>' in page
    assert f"<td>{records[1]['dino']:.4f}</td>" in page


def test_run_without_class_images_has_no_pres(models, tmp_path):
    run = _fake_run(tmp_path, epochs=(1,), with_class=False)
    e = evaluators.load_evaluators(str(models["clip_dir"]), str(models["dino_dir"]), "cpu", progress=False)
    records, best, ckpt = finished_run.evaluate_run(run, e)
    assert len(records) == 1 and "pres" not in records[0] and best["epoch"] == 1
    assert ckpt == (run / "checkpoints" / "step_000006", 6)


@pytest.mark.parametrize("argv, message", [
    ([], "give one of"),
    (["RUN", "--generated", "x"], "give one of"),
    (["--generated", "g"], "needs --real"),
    (["NO_SUCH_RUN"], "does not exist"),
    (["--real", "NOPE", "--generated", "NOPE2", "--prompt", "p"], "does not exist"),
    (["--generate", "0", "--real", "r", "--class-noun", "dog"], "at least 1"),
    (["--generate", "2", "--real", "r"], "--class-noun"),
    (["--batch-size", "x"], "invalid int"),
    (["--generated", "g", "--real", "r", "--prompt", "p", "--device", "gpu0"], "--device must be cuda, cuda:N or cpu"),
])
def test_cli_bad_input_one_error_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [str(tmp_path / "run") if a == "RUN" else a for a in argv]
    try:
        rc = evaluate.main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_bad_run_folders_and_models(models, tmp_path):
    e = models["ev"]
    run = _fake_run(tmp_path)
    (run / "config.json").write_text("{}")
    with pytest.raises(UserError, match="not a train.py run config"):
        finished_run.evaluate_run(run, e)
    run = _fake_run(tmp_path / "b")
    for d in (run / "samples").iterdir():
        for f in d.iterdir():
            f.unlink()
    with pytest.raises(UserError, match="--validate-every"):
        finished_run.evaluate_run(run, e)
    with pytest.raises(UserError, match="--clip-model .*not a CLIP model"):
        evaluators.load_evaluators(str(models["dino_dir"]), str(models["dino_dir"]), "cpu")
    with pytest.raises(UserError, match="--dino-model .*cannot load the DINO model") as info:
        evaluators.load_evaluators(str(models["clip_dir"]), str(tmp_path / "missing" / "model"), "cpu")
    assert "\n" not in str(info.value)


def test_generate_mode(models, tiny_sd1, tmp_path):
    real = _save(_images(2, seed=60, size=(64, 64)), tmp_path / "real")
    out = tmp_path / "eval"
    text = _cli(["--generate", "2", "--real", str(real), "--class-noun", "dog", "--model", str(tiny_sd1["single"]),
                 "--num-prompts", "2", "--steps", "2", "--resolution", "64", "--out", str(out)], models)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["prompts"] == prompts_for("dog")[:2] == ["a sks dog in the jungle", "a sks dog in the snow"]
    assert sorted(p.name for p in out.iterdir()) == ["class", "metrics.json", "prompt_00", "prompt_01"]
    assert sorted(p.name for p in (out / "prompt_01").iterdir()) == ["0.png", "1.png"]
    assert json.loads(text)["dino"] == saved["dino"] and all(k in saved for k in ("clip_t", "pres", "div"))
    # the same numbers from the saved images
    gen = pre.read_images(out / "prompt_00") + pre.read_images(out / "prompt_01")
    want = evaluators.evaluate_epoch(models["ev"], pre.read_images(real), gen, [saved["prompts"][0]] * 2 + [saved["prompts"][1]] * 2,
                             pre.read_images(out / "class"))
    assert all(saved[k] == pytest.approx(want[k], abs=1e-5) for k in want)


def test_prompt_sets():
    assert len(OBJECT_PROMPTS) == len(LIVE_PROMPTS) == 25 and len(set(OBJECT_PROMPTS) | set(LIVE_PROMPTS)) == 35
    assert all(p.count("{}") == 1 for p in OBJECT_PROMPTS + LIVE_PROMPTS)
    assert prompts_for("dog")[10] == "a sks dog wearing a red hat"
    assert prompts_for("backpack")[10] == "a sks backpack with a wheat field in the background"
    assert prompts_for("young  woman", token="zwx")[-1] == "a cube shaped zwx young woman"
    assert [is_live(n) for n in ("dog", "cats", "man", "stuffed animal", "teapot", "toy dog")] == \
        [True, True, True, False, False, False]
    with pytest.raises(UserError):
        prompts_for("  ")
    assert math.isfinite(ev.CLIP_T_MARGIN) and ev.CLIP_T_MARGIN == 0.01


def test_training_scores_its_validation_epochs_and_keeps_the_best(models, tiny_sd1, tmp_path):
    """--eval-every during training: a metrics.jsonl line per scored epoch, class images for PRES,
    lora_best.safetensors from the best epoch, and evaluate.py on the same run agrees."""
    from test_training import config

    from dreambooth_min.run.training import train

    cfg = config(tmp_path, tiny_sd1["single"], steps=6, eval_every=1, keep_best=True, validation_images=2,
                 validation_steps=2, clip_model=str(models["clip_dir"]), dino_model=str(models["dino_dir"]))
    result = train(cfg, log=lambda *_: None)
    run = result["output"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1, 2]  # 3 photos, batch 1: 6 steps = 2 epochs, plus the untouched model
    for r in records:
        assert all(-1 <= r[k] <= 1 for k in ("dino", "clip_i", "clip_t", "pres"))
    assert (run / "samples" / "epoch_0002" / "class_1.png").exists() and (run / "metrics.png").exists()
    best = ev.best_epoch(records)
    assert (run / "lora_best.safetensors").exists() and best is not None
    page = (run / "report.html").read_text()  # the metrics table, the best epoch marked, PRES's class images
    assert f'<tr class="best"><td>{best["epoch"]} (best)</td>' in page and "lora_best.safetensors" in page
    assert page.count('<td class="prompt">a photo of dog</td>') == 3
    records_again, best_again, _ = finished_run.evaluate_run(run, models["ev"])
    for a, b in zip(records, records_again):
        assert a["dino"] == pytest.approx(b["dino"], abs=1e-3)  # the PNGs round pixels to 8 bits
    assert best_again["epoch"] == best["epoch"]
