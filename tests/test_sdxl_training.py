"""DreamBooth-LoRA on SDXL: the size conditioning of each photo, the batch's per-row time ids, the kohya SDXL
LoRA file (LDM UNet names, te1 / te2) in diffusers, other families refused, and training runs on a tiny
random SDXL model (loss falls, resume is byte-identical, both text encoders learn)."""
import torch
from PIL import Image

from dreambooth_min.data import LatentCache, load_instance_images, original_size, photo_time_ids
from dreambooth_min.dreambooth import assemble_batch


# ---------------------------------------------------------------------------------------------------
# Size conditioning: what diffusers' train_dreambooth_lora_sdxl.py --center_crop computes


def test_photo_time_ids_closed_form():
    """torchvision's Resize(R) makes the short side R and the long side int(R * long / short); CenterCrop's
    top-left is round((side - R) / 2) (Python's round: 66.5 -> 66). Worked by hand for R = 256."""
    ids = photo_time_ids([(600, 400), (333, 500), (300, 457), (256, 256), (1000, 1000)], 256)
    assert ids.tolist() == [[600, 400, 64, 0, 256, 256],     # 384 x 256 after resizing: crop 64 rows off the top
                            [333, 500, 0, 64, 256, 256],     # int(256 * 500 / 333) = 384 wide
                            [300, 457, 0, 66, 256, 256],     # int(389.97) = 389 wide, round(66.5) = 66
                            [256, 256, 0, 0, 256, 256],
                            [1000, 1000, 0, 0, 256, 256]]
    assert ids.dtype == torch.float32


def test_original_size_is_the_upright_photo(tmp_path):
    """A phone photo stored 40 x 30 with EXIF orientation 6 (rotate 90 degrees) is a 40-high, 30-wide photo."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 30), "red").save(tmp_path / "a.jpg", exif=exif)
    Image.new("RGB", (40, 30), "red").save(tmp_path / "b.png")
    assert original_size(tmp_path / "a.jpg") == (40, 30)
    assert original_size(tmp_path / "b.png") == (30, 40)
    (tmp_path / "c.png").write_bytes(b"not an image")  # skipped: the sizes stay aligned with the images
    images, captions, _, sizes = load_instance_images(tmp_path, 16, "p", with_sizes=True)
    assert len(images) == len(captions) == len(sizes) == 2 and sizes == [(40, 30), (30, 40)]


class _VAE(torch.nn.Module):
    """A stand-in VAE: the posterior mean is the image's top-left 4 x 2 x 2 corner, std 0."""
    scaling_factor = 1.0

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))

    def encode(self, x):
        mean = torch.cat([x[:, :2, :2, :2], x[:, :2, :2, :2]], dim=1)
        return mean, torch.full_like(mean, -100.0)


def test_batch_rows_carry_their_own_time_ids():
    """Subject rows get their photo's ids, class rows their class image's, in the batch's row order."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 8, 8, generator=g)
    sizes = photo_time_ids([(600, 400), (400, 600), (512, 512)], 256)
    class_sizes = photo_time_ids([(256, 256)] * 2, 256)
    inst = LatentCache(_VAE(), images, sizes=sizes)
    cls = LatentCache(_VAE(), images[:2] * 0 + 5, sizes=class_sizes + torch.tensor([[0, 0, 0, 1, 0, 0]]))
    batch = assemble_batch(inst, ["a", "b", "c"], torch.tensor([2, 0]), cls, "k", g)
    assert batch.prompts == ["c", "a", "k", "k"] and batch.n_instance == 2
    assert batch.time_ids[:2].tolist() == [sizes[2].tolist(), sizes[0].tolist()]
    assert batch.time_ids[2:].tolist() == [[256, 256, 0, 1, 256, 256]] * 2
    plain = assemble_batch(LatentCache(_VAE(), images), ["a", "b", "c"], torch.tensor([1]), None, "k", g)
    assert plain.time_ids is None  # SD 1.x / 2.x: no size conditioning
