"""--aspect-buckets and masked loss: the bucket lists, one bucket per batch, SDXL's size ids, the mask as a weight
(all white = no mask, bit for bit), bad masks as one line before the model loads, and runs on SD 1.x, 2.x, SDXL
that resume byte for byte."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_min import UserError
from dreambooth_min.dreambooth import Batch, dreambooth_loss
from dreambooth_min.formats.images import find_images
from dreambooth_min.formats.lora_file import load_lora
from dreambooth_min.run import distributed as dist
from dreambooth_min.run.buckets import SDXL_BUCKETS, bucket_for, bucket_list, class_counts, epoch_batch
from dreambooth_min.run.data import (LatentCache, check_masks, epoch_order, latent_mask, load_mask, load_photos,
                                     photo_time_ids)
from dreambooth_min.run.training import train
from test_training import config

# ---------------------------------------------------------------------------------------------------
# Buckets


def test_bucket_lists():
    # kohya's default list at 512 (sd-scripts: min 256, max 1024, steps of 64), as (height, width).
    kohya_512 = {(256, 1024), (320, 768), (384, 640), (448, 576), (512, 512), (576, 448), (640, 384), (768, 320),
                 (1024, 256), (832, 256), (896, 256), (960, 256), (256, 832), (256, 896), (256, 960),
                 (704, 320), (320, 704)}
    assert set(bucket_list(512)) == kohya_512
    for res in (128, 512, 768):
        assert all(h % 64 == 0 and w % 64 == 0 and h * w <= res * res for h, w in bucket_list(res))
    # SDXL's list (Podell et al. 2023): 40 sizes from 512 x 2048 to 2048 x 512, all near 1024^2.
    xl = bucket_list(1024)
    assert len(xl) == 40 and set(xl) == set(SDXL_BUCKETS) and (1024, 1024) in xl and (704, 1344) in xl
    assert (512, 2048) in xl and (2048, 512) in xl and (1344, 704) not in xl  # the report's table, as it is
    assert all(0.9 < h * w / 1024 ** 2 < 1.05 for h, w in xl)
    assert bucket_for((1200, 800), xl) == (1216, 832) and bucket_for((500, 2000), xl) == (512, 2048)
    with pytest.raises(UserError, match="at least 64"):
        bucket_list(32)


def test_batches_come_from_one_bucket_and_cover_the_epoch():
    buckets = [(1, 1), (2, 1), (1, 1), (2, 1), (1, 1), (3, 1), (1, 1)]
    for epoch in range(5):
        order = epoch_order(7, 3, epoch)
        assert all(torch.equal(epoch_batch(order, pos, 3), order[pos * 3:(pos + 1) * 3]) for pos in range(3))
        batches = [epoch_batch(order, pos, 2, buckets) for pos in range(2 + 1 + 1)]  # ceil(4/2) + ceil(2/2) + 1
        assert sorted(i for b in batches for i in b.tolist()) == list(range(7))
        assert all(len({buckets[i] for i in b.tolist()}) == 1 and len(b) <= 2 for b in batches)
        firsts = [order.tolist().index(b[0].item()) for b in batches]
        assert firsts == sorted(firsts)  # the batches in the order of their first photo
    assert class_counts(buckets, 100) == {(1, 1): 57, (2, 1): 29, (3, 1): 14}
    assert class_counts(buckets, 2) == {(1, 1): 1, (2, 1): 1, (3, 1): 1}  # every bucket gets class images


def test_sdxl_size_ids_of_a_bucketed_photo():
    # 1200 x 800 (h x w) into 1216 x 832: covered at 1248 x 832, 16 rows cut at the top.
    assert photo_time_ids([(1200, 800)], 1024, [(1216, 832)]).tolist() == [[1200, 800, 16, 0, 1216, 832]]
    sizes = [(600, 400), (333, 500), (1000, 1000)]  # square targets: the centre-crop formula
    assert torch.equal(photo_time_ids(sizes, 256, [(256, 256)] * 3), photo_time_ids(sizes, 256))


# ---------------------------------------------------------------------------------------------------
# Masks


def test_the_mask_is_a_per_pixel_weight_and_white_is_no_mask():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(4, 4, 8, 8, generator=g, requires_grad=True)
    target = torch.randn(4, 4, 8, 8, generator=g)
    w = torch.tensor([1.0, 0.5, 2.0, 0.7])
    plain = dreambooth_loss(pred, target, 2, 0.7, w)
    grad_plain = torch.autograd.grad(plain[0], pred)[0]
    white = dreambooth_loss(pred, target, 2, 0.7, w, torch.ones(4, 1, 8, 8))
    assert all(torch.equal(a, b) for a, b in zip(plain, white))
    assert torch.equal(torch.autograd.grad(white[0], pred)[0], grad_plain)
    # Left half black on the subject's rows: their error counts only on the right half; class rows unmasked.
    mask = torch.ones(4, 1, 8, 8)
    mask[:2, :, :, :4] = 0
    loss, inst, prior = dreambooth_loss(pred, target, 2, 0.7, w, mask)
    e = (pred.detach() - target) ** 2
    assert inst.item() == pytest.approx(((e[:2, :, :, 4:].mean(dim=(1, 2, 3)) * w[:2]).mean()).item(), rel=1e-6)
    assert torch.equal(prior, plain[2])
    grey = dreambooth_loss(pred, target, 2, 0.7, None, torch.full((4, 1, 8, 8), 0.25))[1]
    assert grey.item() == pytest.approx(e[:2].mean().item(), rel=1e-6)  # a uniform grey is normalised away


def test_masks_are_cut_with_their_photo_and_mirrored_with_its_mirror_image(tmp_path):
    # A 200 x 100 photo (w x h) whose left half is red; its mask is white there. Bucket 256 x 64 (w x h).
    photo = np.zeros((100, 200, 3), np.uint8)
    photo[:, :100, 0] = 255
    Image.fromarray(photo).save(tmp_path / "a.png")
    Image.fromarray(photo[:, :, 0]).save(tmp_path / "a.mask.png")
    assert [p.name for p in find_images(tmp_path)] == ["a.png"]  # a mask is not a photo
    masks = check_masks(tmp_path)
    photos = load_photos(tmp_path, 128, "p", bucket_list(128), masks)
    assert photos.buckets == [(64, 192)] and photos.images[0].shape == (3, 64, 192)
    red, m = photos.images[0][0] > 0, photos.masks[0][0]
    assert ((m > 0.5) == red).float().mean() > 0.99  # the same crop and resize
    assert torch.equal(load_mask(tmp_path / "a.mask.png", (64, 192)), photos.masks[0])
    # On the latent grid: the area average of each 8 x 8 block.
    grid = latent_mask(photos.masks[0], (8, 24))
    assert torch.allclose(grid, photos.masks[0].view(1, 8, 8, 24, 8).mean(dim=(2, 4)))

    class Vae:  # the posterior of x is (x downsampled, 0): enough to see which view was drawn
        scaling_factor = 1.0

        def parameters(self):
            yield torch.zeros(1)

        def encode(self, x):
            mean = torch.nn.functional.avg_pool2d(x[:, :1], 8).repeat(1, 4, 1, 1)
            return mean, torch.full_like(mean, -100.0)

    cache = LatentCache(Vae(), photos.images, flip=True, masks=photos.masks)
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        z, weight = cache.draw([0], g)
        assert torch.equal((z[0, 0] > 0), (weight[0, 0] > 0.5))  # the mask follows the (mirrored) photo


def _photos(folder, shapes):
    """Photos of sizes `shapes` [(w, h)]: smooth, distinct colour gradients."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(shapes):
        y, x = np.mgrid[0:h, 0:w]
        rgb = np.stack([x / w * (i + 1) / len(shapes), y / h, (1 - x / w) * (len(shapes) - i) / len(shapes)], -1)
        Image.fromarray((rgb * 255).astype(np.uint8)).save(folder / f"img{i}.png")
    return folder


def _masks(folder, value=lambda w, h: np.full((h, w), 255, np.uint8)):
    for p in find_images(folder):
        w, h = Image.open(p).size
        Image.fromarray(value(w, h)).save(p.with_name(p.stem + ".mask.png"))


def test_bad_masks_are_one_line_before_the_model_is_loaded(tmp_path):
    cfg = config(tmp_path, tmp_path / "no-such-model")  # a model that would fail to load: masks are checked first
    images = Path(cfg.images)  # three 48 x 48 photos
    Image.new("L", (48, 48), 255).save(images / "img0.mask.png")
    with pytest.raises(UserError, match=r"img1.png has no mask .*img1.mask.png"):
        train(cfg)
    (images / "img1.mask.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"cannot read the mask .*img1.mask.png"):
        train(cfg)
    Image.new("L", (40, 48), 255).save(images / "img1.mask.png")
    with pytest.raises(UserError, match=r"mask .*img1.mask.png is 40x48 but its photo img1.png is 48x48"):
        train(cfg)
    Image.new("L", (48, 48), 0).save(images / "img1.mask.png")
    with pytest.raises(UserError, match=r"img1.mask.png is black everywhere"):
        train(cfg)
    cfg.masks = str(tmp_path / "nowhere")
    with pytest.raises(UserError, match="--masks .*nowhere is not a folder"):
        train(cfg)
    assert not Path(cfg.output).exists()


# ---------------------------------------------------------------------------------------------------
# Training runs on the tiny models


def test_a_white_mask_changes_nothing_and_a_half_black_one_changes_the_lora(tiny_sd1, tmp_path):
    kw = dict(steps=3, class_dir=str(tmp_path / "class"))
    plain = train(config(tmp_path / "plain", tiny_sd1["single"], **kw))
    white_cfg = config(tmp_path / "white", tiny_sd1["single"], **kw)
    _masks(Path(white_cfg.images))
    white = train(white_cfg)
    assert plain["lora"].read_bytes() == white["lora"].read_bytes()
    half_cfg = config(tmp_path / "half", tiny_sd1["single"], masks=str(tmp_path / "masks"), **kw)
    (tmp_path / "masks").mkdir()
    for p in find_images(half_cfg.images):  # --masks DIR/name.png: the left half black
        w, h = Image.open(p).size
        Image.fromarray(np.where(np.arange(w) < w // 2, 0, 255).astype(np.uint8)[None].repeat(h, 0)).save(
            tmp_path / "masks" / p.name)
    half = train(half_cfg)
    a, b = load_lora(plain["lora"])[0], load_lora(half["lora"])[0]
    assert max((a[k] - b[k]).abs().max().item() for k in a) > 1e-6


@pytest.mark.parametrize("version", ["sd1", "sd2", "sdxl"])
def test_buckets_and_masks_train_and_resume_byte_for_byte(version, tmp_path, request, capsys):
    tiny = request.getfixturevalue(f"tiny_{version}")
    images = _photos(tmp_path / "images", [(128, 128), (200, 80), (80, 200), (130, 120)])  # w x h
    _masks(images, lambda w, h: np.where(np.arange(w) < w // 3, 64, 255).astype(np.uint8)[None].repeat(h, 0))
    kw = dict(images=str(images), resolution=128, aspect_buckets=True, batch_size=2, steps=4, num_class_images=4,
              class_dir=str(tmp_path / "class"))
    model = tiny["folder"] if version == "sdxl" else tiny["single"]
    a = train(config(tmp_path / "a", model, **kw))
    plan = capsys.readouterr().out
    assert "buckets     128x128: 2 photos, 192x64: 1 photo, 64x192: 1 photo (width x height)" in plan, plan
    assert "masks from name.mask.png" in plan and "4 of 'a photo of dog' in" in plan and "in 3 sizes (a share per bucket)" in plan
    # Class images in proportion to the photos, at their bucket's size (the square one in class_dir itself).
    sizes = {p.parent.name: Image.open(p).size for p in (tmp_path / "class").rglob("*.png")}
    assert len(list((tmp_path / "class").glob("*.png"))) == 2 and sizes["192x64"] == (192, 64)
    assert sizes["64x192"] == (64, 192) and sizes["class"] == (128, 128)
    cfg = config(tmp_path / "b", model, **kw)
    assert train(cfg, stop_after=2)["interrupted"]
    b = train(cfg, resume=True)
    assert b["step"] == 4 and a["lora"].read_bytes() == b["lora"].read_bytes()
    assert any(v.abs().max() > 0 for k, v in load_lora(a["lora"])[0].items() if "lora_up" in k)


def test_a_process_keeps_its_rows_masks(monkeypatch):
    """torchrun: each process keeps the mask rows of its batch rows (the rest of local_batch is test_distributed's)."""
    x = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 4, 2, 2)
    mask = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 2, 2)
    batch = Batch(x, -x, torch.arange(4), ["p"] * 4, 2, mask=mask)
    monkeypatch.setattr(dist, "_world", 2)
    for rank in range(2):
        monkeypatch.setattr(dist, "_rank", rank)
        local, _ = dist.local_batch(batch)
        assert torch.equal(local.mask[:, 0, 0, 0], local.latents[:, 0, 0, 0]) and len(local.mask) == 2


def test_torchrun_with_buckets_and_masks_equals_one_process(tiny_sd1, tmp_path):
    """Two processes with batch 1 == one with batch 2, with buckets (a global batch of 2 from the square bucket,
    of 1 from each single: one process then has no rows) and masks."""
    from test_distributed import launch, lora_difference

    images = _photos(tmp_path / "images", [(128, 128), (200, 80), (80, 200), (130, 120)])
    _masks(images, lambda w, h: np.where(np.arange(w) < w // 3, 64, 255).astype(np.uint8)[None].repeat(h, 0))
    args = ["--images", str(images), "--model", str(tiny_sd1["single"]), "--class-noun", "dog", "--resolution", "128",
            "--aspect-buckets", "--num-class-images", "3", "--class-steps", "2", "--class-dir", str(tmp_path / "c"),
            "--steps", "3", "--validate-every", "0", "--save-every", "0", "--lr", "1e-3", "--seed", "3"]
    runs = tmp_path / "runs"
    one = launch(tmp_path, args + ["--batch-size", "2", "--output", str(runs / "one")], 1)
    assert one.returncode == 0, one.stderr[-3000:]
    two = launch(tmp_path, args + ["--batch-size", "1", "--output", str(runs / "two")], 2)
    assert two.returncode == 0, two.stderr[-3000:]
    difference = lora_difference(runs / "one" / "lora.safetensors", runs / "two" / "lora.safetensors")
    assert difference < 1e-4, difference
