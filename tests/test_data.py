"""Instance images: every PIL mode -> right colours, EXIF rotation, crop geometry, captions, errors, latent cache."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from dreambooth_min.errors import UserError
from dreambooth_min.formats.images import find_images, to_rgb
from dreambooth_min.run.data import LatentCache, encode_latents, load_image, load_instance_images

torch.set_num_threads(1)

RED = torch.tensor([1.0, -1.0, -1.0])
WHITE = torch.tensor([1.0, 1.0, 1.0])


def rgb_of(x):
    """The colour of the image's centre pixel, [3] in [-1, 1]."""
    return x[:, x.shape[1] // 2, x.shape[2] // 2]


def load(tmp_path, img, name="x.png", res=8, **save):
    path = tmp_path / name
    img.save(path, **save)
    x, _ = load_image(path, res)
    assert x.shape == (3, res, res) and x.dtype == torch.float32
    return x


def close(x, rgb, tol=1e-6):
    return (x - torch.as_tensor(rgb, dtype=torch.float32).view(3, 1, 1)).abs().max().item() <= tol


def test_modes_red(tmp_path):
    red = Image.new("RGB", (12, 10), (255, 0, 0))
    assert close(load(tmp_path, red), RED)
    assert close(load(tmp_path, red.convert("RGBA")), RED)
    assert close(load(tmp_path, red.convert("P")), RED)
    assert close(load(tmp_path, red, "x.webp", lossless=True), RED)
    cmyk = Image.new("CMYK", (12, 10), (0, 255, 255, 0))  # no cyan, full magenta + yellow = red
    assert close(load(tmp_path, cmyk, "x.jpg", quality=95), RED, tol=0.05)  # JPEG rounding


def test_transparency_composited_on_white(tmp_path):
    assert close(load(tmp_path, Image.new("RGBA", (8, 8), (0, 0, 0, 0))), WHITE)  # not black
    half = load(tmp_path, Image.new("RGBA", (8, 8), (255, 0, 0, 128)))  # 50% red over white
    assert close(half, [1.0, 127 / 127.5 - 1, 127 / 127.5 - 1], tol=1 / 127.5)
    assert close(load(tmp_path, Image.new("LA", (8, 8), (0, 0))), WHITE)
    p = Image.new("P", (8, 8), 1)
    p.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    p.info["transparency"] = 1  # palette entry 1 (green) is transparent
    assert close(load(tmp_path, p), WHITE)
    p.info.pop("transparency")
    assert close(load(tmp_path, p), [-1.0, 1.0, -1.0])


def test_gray_modes(tmp_path):
    g = 128 / 127.5 - 1
    assert close(load(tmp_path, Image.new("L", (8, 8), 128)), [g, g, g])
    assert close(load(tmp_path, Image.new("1", (8, 8), 1)), WHITE)
    # 16-bit PNG: 65535 is white, 32896 = 128 * 257 is 8-bit 128 (Pillow's convert('L') would clip it to 255)
    for value, expect in ((65535, 1.0), (32896, g), (0, -1.0)):
        img = Image.new("I;16", (8, 8), value)
        assert close(load(tmp_path, img), [expect] * 3), value
    assert Image.open(tmp_path / "x.png").mode == "I;16"
    # 'I' (32-bit) and 'F' do not say their range: 0..255, 0..65535 or 0..1 is inferred from the peak
    for mode, value, expect in (("I", 65535, 1.0), ("I", 200, 200 / 127.5 - 1), ("I", 32896, g),
                                ("F", 1.0, 1.0), ("F", 0.5, g), ("F", 128.0, g)):
        out = to_rgb(Image.new(mode, (4, 4), value))
        assert out.mode == "RGB" and out.getpixel((0, 0)) == (round((expect + 1) * 127.5),) * 3, (mode, value)


def test_exif_orientation(tmp_path):
    # stored 60x30 (landscape), top half red, bottom half blue; Orientation 6 = rotate 90 deg clockwise
    # to display, so the displayed image is 30x60 (portrait) with red on the right, blue on the left
    img = Image.new("RGB", (60, 30), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 60, 15))
    exif = Image.Exif()
    exif[0x0112] = 6
    x = load(tmp_path, img, "rot.jpg", res=16, exif=exif, quality=95)
    assert close(x[:, :, -5:], RED, tol=0.1)
    assert close(x[:, :, :5], [-1.0, -1.0, 1.0], tol=0.1)
    # without the tag the halves are top / bottom
    x = load(tmp_path, img, "plain.jpg", res=16, quality=95)
    assert close(x[:, :5], RED, tol=0.1) and close(x[:, -5:], [-1.0, -1.0, 1.0], tol=0.1)


def test_resize_center_crop_geometry(tmp_path):
    # 80x40: green | black | white | blue bands of 20 px; the centre 40x40 square is black | white
    img = Image.new("RGB", (80, 40), (0, 255, 0))
    img.paste((0, 0, 0), (20, 0, 40, 40))
    img.paste((255, 255, 255), (40, 0, 60, 40))
    img.paste((0, 0, 255), (60, 0, 80, 40))
    img.save(tmp_path / "g.png")
    x, warning = load_image(tmp_path / "g.png", 16)
    assert warning is None and x.shape == (3, 16, 16)
    assert close(x[:, :, 1:7], [-1.0] * 3, tol=0.02) and close(x[:, :, 9:15], WHITE, tol=0.02)
    # the same as resizing the whole image (short side -> 16) and cutting out the centre 16x16
    ref = img.resize((32, 16), Image.Resampling.LANCZOS).crop((8, 0, 24, 16))
    ref = torch.frombuffer(bytearray(ref.tobytes()), dtype=torch.uint8).view(16, 16, 3).permute(2, 0, 1) / 127.5 - 1
    assert (x - ref).abs().max() <= 2 / 127.5
    # the green / blue bands beyond the crop leak in only through the filter's support, at the border
    assert (x[1, :, 0] - x[0, :, 0]).max() < 0.15 and (x[2, :, -1] - x[0, :, -1]).max() < 0.15
    # portrait: crop rows, same centring
    img.transpose(Image.Transpose.TRANSPOSE).save(tmp_path / "g.png")
    x, _ = load_image(tmp_path / "g.png", 16)
    assert close(x[:, 1:7], [-1.0] * 3, tol=0.02) and close(x[:, 9:15], WHITE, tol=0.02)


def test_small_image_upscaled_with_warning(tmp_path):
    Image.new("RGB", (10, 12), (255, 0, 0)).save(tmp_path / "small.png")
    x, warning = load_image(tmp_path / "small.png", 16)
    assert x.shape == (3, 16, 16) and close(x, RED, tol=1e-6)
    assert "small.png is 10x12; its 10x10 crop is smaller than 16x16" in warning


def test_find_images_and_captions(tmp_path):
    for name in ("b.PNG", "a.jpg", "c.jpeg", "d.webp", "._a.jpg", "e.gif", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in find_images(tmp_path)] == ["a.jpg", "b.PNG", "c.jpeg", "d.webp"]

    folder = tmp_path / "inst"
    folder.mkdir()
    for i, name in enumerate(("a.jpg", "b.png", "c.png")):
        Image.new("RGB", (20, 16), (i * 100, 0, 0)).save(folder / name)
    (folder / "a.txt").write_text("  a photo of sks dog on a beach\n")
    (folder / "c.txt").write_text("   \n")  # empty caption: the instance prompt
    images, captions, warnings = load_instance_images(folder, 16, "a photo of sks dog")
    assert images.shape == (3, 3, 16, 16) and warnings == []
    assert captions == ["a photo of sks dog on a beach", "a photo of sks dog", "a photo of sks dog"]
    assert close(images[1], [100 / 127.5 - 1, -1, -1])  # sorted order: b.png is the second, red = 100


def test_errors_and_unreadable_warning(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_instance_images(tmp_path / "nope", 16, "p")
    (tmp_path / "file.jpg").write_bytes(b"x")
    with pytest.raises(UserError, match="is not a folder"):
        load_instance_images(tmp_path / "file.jpg", 16, "p")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("hi")
    with pytest.raises(UserError, match="holds no images"):
        load_instance_images(empty, 16, "p")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match="none of the 1 images .* broken.jpg"):
        load_instance_images(bad, 16, "p")
    Image.new("RGB", (16, 16)).save(bad / "good.png")
    images, captions, warnings = load_instance_images(bad, 16, "p")
    assert images.shape == (1, 3, 16, 16) and captions == ["p"]
    assert len(warnings) == 1 and warnings[0].startswith("skipped unreadable image broken.jpg")
    # a truncated file is unreadable too, not a crash
    Image.new("RGB", (64, 64), (10, 200, 30)).save(bad / "trunc.jpg", quality=95)
    data = (bad / "trunc.jpg").read_bytes()
    (bad / "trunc.jpg").write_bytes(data[: len(data) // 2])
    _, _, warnings = load_instance_images(bad, 16, "p")
    assert any("trunc.jpg" in w for w in warnings)


# ---------------------------------------------------------------------------------------------
# latent cache

class StandInVAE(nn.Module):
    """encode: mean = 8x8 average of (r, g, b, r - b), logvar = a per-channel constant (closed form)."""

    scaling_factor = 0.18215

    def __init__(self, logvar=(-2.0, -1.0, 0.0, -30.0)):
        super().__init__()
        self.logvar = nn.Parameter(torch.tensor(logvar).view(1, 4, 1, 1))

    def encode(self, x):
        m = F.avg_pool2d(x, 8)
        mean = torch.cat([m, m[:, :1] - m[:, 2:]], 1)
        return mean, self.logvar.expand_as(mean)


def test_encode_latents_closed_form():
    torch.manual_seed(0)
    images = torch.rand(5, 3, 16, 24) * 2 - 1
    vae = StandInVAE()
    mean, std = encode_latents(vae, images, batch_size=2)  # 3 batches: 2 + 2 + 1
    assert mean.shape == std.shape == (5, 4, 2, 3)
    assert torch.allclose(mean, vae.encode(images)[0])
    assert torch.allclose(std, torch.exp(0.5 * vae.logvar).expand_as(std))


def test_latent_cache_samples_and_flips():
    torch.manual_seed(0)
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    vae = StandInVAE(logvar=(-30.0,) * 4)  # std ~ 3e-7: a sample is (almost exactly) the chosen view's mean
    cache = LatentCache(vae, images, flip=True)
    views = [vae.encode(images)[0] * vae.scaling_factor, vae.encode(images.flip(-1))[0] * vae.scaling_factor]
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(20):
        idx = torch.tensor([2, 0])
        z = cache.sample(idx, generator=g)
        assert z.shape == (2, 4, 2, 2)
        for j, i in enumerate(idx):
            hits = [v for v in (0, 1) if (z[j] - views[v][i]).abs().max() < 1e-5]
            assert hits, "sample is neither the image's latent nor its mirror's"
            seen.update(hits)
    assert seen == {0, 1}  # both the image and its mirror are used
    no_flip = LatentCache(vae, images, flip=False)
    for _ in range(5):
        assert (no_flip.sample([1], generator=g)[0] - views[0][1]).abs().max() < 1e-5


def test_latent_cache_distribution():
    """Samples are (mean + std * eps) * scaling_factor: check the first two moments over many draws."""
    images = torch.zeros(1, 3, 8, 8)
    images[:, 0] = 0.5  # mean = (0.5, 0, 0, 0.5)
    vae = StandInVAE()
    cache = LatentCache(vae, images, flip=False)
    z = cache.sample(torch.zeros(20000, dtype=torch.long), generator=torch.Generator().manual_seed(1))[:, :, 0, 0]
    sf = vae.scaling_factor
    expect_mean = torch.tensor([0.5, 0.0, 0.0, 0.5]) * sf
    expect_std = torch.exp(0.5 * torch.tensor([-2.0, -1.0, 0.0, -30.0])) * sf
    assert (z.mean(0) - expect_mean).abs().max() < 0.03 * sf  # ~4 standard errors
    assert ((z.std(0) - expect_std).abs() <= 0.03 * expect_std + 1e-9).all()


def test_latent_cache_with_our_vae():
    vae_mod = pytest.importorskip("dreambooth_min.vae")
    torch.manual_seed(0)
    vae = vae_mod.AutoencoderKL(vae_mod.VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)).eval()
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    mean, std = encode_latents(vae, images, batch_size=2)
    m, logvar = vae.encode(images)
    assert mean.shape == (3, 4, 8, 8)
    assert (mean - m).abs().max() <= 1e-5 and (std - torch.exp(0.5 * logvar)).abs().max() <= 1e-5
    cache = LatentCache(vae, images)
    assert cache.mean.shape == (3, 2, 4, 8, 8) and len(cache) == 3
    assert (cache.mean[:, 1] - vae.encode(images.flip(-1))[0]).abs().max() <= 1e-5
