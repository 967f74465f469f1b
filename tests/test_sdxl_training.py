"""DreamBooth-LoRA on SDXL: the size conditioning of each photo, the batch's per-row time ids, the kohya SDXL
LoRA file (LDM UNet names, te1 / te2) in diffusers, other families refused, and training runs on a tiny
random SDXL model (loss falls, resume is byte-identical, both text encoders learn)."""
import torch
from PIL import Image

from dreambooth_min.dreambooth import assemble_batch
from dreambooth_min.run.data import LatentCache, load_instance_images, original_size, photo_time_ids


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


# ---------------------------------------------------------------------------------------------------
# The LoRA file: kohya's SDXL names, read by diffusers; others' SDXL files read by us; families refused

def _sdxl_modules(seed=0):
    """The tiny SDXL's UNet (no attention at level 0, 1/2/3 transformer blocks, text_time) and its two text
    encoders (CLIPTextModel, CLIPTextModelWithProjection), seeded random, fp32, eval mode (tests/tiny_sdxl.py)."""
    from tiny_sdxl import make_pipeline

    pipe = make_pipeline(seed)
    return pipe.unet, pipe.text_encoder, pipe.text_encoder_2


def _trained_like(unet, text, text_2, seed=1, std=0.05):
    """LoRA wrappers on all three (as --train-text-encoder), their up factors random as after training."""
    from dreambooth_min.lora import TEXT_TARGETS, UNET_TARGETS, inject_lora

    torch.manual_seed(seed)
    loras = [inject_lora(unet, UNET_TARGETS, rank=4, alpha=2), inject_lora(text, TEXT_TARGETS, rank=2),
             inject_lora(text_2, TEXT_TARGETS, rank=2, alpha=3)]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for d in loras:
            for m in d.values():
                m.lora_up.weight.copy_(std * torch.randn(m.lora_up.weight.shape, generator=g))
    return loras


def test_kohya_sdxl_names():
    """UNet layers by their LDM paths (sd-scripts' SDXL UNet, ComfyUI, A1111), text encoders as te1 / te2."""
    import copy

    from dreambooth_min.formats.lora_file import lora_state_dict
    from dreambooth_min.formats.lora_names import kohya_unet_paths

    unet, text, text_2 = _sdxl_modules()
    paths = kohya_unet_paths(unet)
    loras = _trained_like(copy.deepcopy(unet), copy.deepcopy(text), copy.deepcopy(text_2))
    tensors = lora_state_dict(loras[0], loras[1], text_loras_2=loras[2], unet_paths=paths)
    names = {k.split(".")[0] for k in tensors}
    # down_blocks.1 is LDM level 1: input_blocks 4 and 5 (k = 1 + 3 * level + j); up_blocks.0 = output_blocks 0-2
    # The released SDXL's block numbers (k = 1 + 3 * level + j): level 1 = input_blocks 4, 5; level 2 = 7, 8;
    # up_blocks.0 (level 2) = output_blocks 0-2, up_blocks.1 = 3-5.
    for name in ("lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k",
                 "lora_unet_input_blocks_8_1_transformer_blocks_2_attn1_to_out_0",
                 "lora_unet_middle_block_1_transformer_blocks_2_attn1_to_q",
                 "lora_unet_output_blocks_0_1_transformer_blocks_2_attn2_to_v",
                 "lora_unet_output_blocks_5_1_transformer_blocks_1_attn2_to_v",
                 "lora_te1_text_model_encoder_layers_2_self_attn_q_proj",
                 "lora_te2_text_model_encoder_layers_0_self_attn_out_proj"):
        assert name in names, name
    assert not any(n.startswith(("lora_unet_down_blocks", "lora_unet_mid_block", "lora_unet_up_blocks", "lora_te_"))
                   for n in names)
    assert len(names) == len(loras[0]) + len(loras[1]) + len(loras[2])
    assert tensors["lora_te2_text_model_encoder_layers_0_self_attn_out_proj.alpha"].item() == 3.0


def test_kohya_names_at_the_released_shape_name_real_tensors():
    """At the released SDXL shape (every LoCon-able layer wrapped, on the meta device), each lora_unet_ name is a
    tensor of sd_xl_base_1.0.safetensors (tests/data/sdxl_keys.json) with '.' -> '_': what ComfyUI and A1111 match."""
    import json
    from pathlib import Path

    from dreambooth_min.lora import CONV_TARGETS, UNET_TARGETS, inject_lora
    from dreambooth_min.formats.lora_names import kohya_name, kohya_unet_paths
    from dreambooth_min.unet import UNet2DConditionModel, UNetConfig

    real = json.loads((Path(__file__).parent / "data" / "sdxl_keys.json").read_text())
    ldm = {kohya_name(k[len("model.diffusion_model."):-len(".weight")], "unet")
           for k in real if k.startswith("model.diffusion_model.") and k.endswith(".weight")}
    with torch.device("meta"):
        unet = UNet2DConditionModel(UNetConfig.sdxl())
        loras = inject_lora(unet, UNET_TARGETS + ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2") + CONV_TARGETS, 4)
    paths = kohya_unet_paths(unet)
    names = {kohya_name(paths[p], "unet") for p in loras}
    assert len(names) == len(loras) == 771 and names <= ldm, sorted(names - ldm)[:3]
    assert "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_k" in names  # level 2: 10 blocks deep


def _pipeline(unet, text, text_2):
    """The tiny SDXL pipeline (VAE, tokenizers, DDIM) around these three modules."""
    from diffusers import StableDiffusionXLPipeline
    from tiny_sdxl import make_pipeline

    return StableDiffusionXLPipeline(**(make_pipeline().components | dict(unet=unet, text_encoder=text,
                                                                          text_encoder_2=text_2)))


def _fused_weights(pipe):
    """{component.path: weight} of a pipeline after fuse_lora, peft's wrappers seen through."""
    out = {}
    for name in ("unet", "text_encoder", "text_encoder_2"):
        for k, v in getattr(pipe, name).state_dict().items():
            if "lora_" not in k:
                out[f"{name}.{k.replace('.base_layer.', '.')}"] = v
    return out


def _our_weights(unet, text, text_2):
    return {f"{n}.{k}": v for n, m in (("unet", unet), ("text_encoder", text), ("text_encoder_2", text_2))
            for k, v in m.state_dict().items()}


def _max_weight_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_our_sdxl_file_in_diffusers_and_theirs_in_ours(tmp_path):
    """Our kohya SDXL file, loaded by diffusers' StableDiffusionXLPipeline.load_lora_weights (its kohya SDXL
    converter), changes the UNet and both text encoders exactly as our apply_lora; and a diffusers / peft SDXL
    file (unet., text_encoder., text_encoder_2. keys) applied by us equals diffusers' own loading."""
    import copy

    from peft.utils import get_peft_model_state_dict

    from dreambooth_min.formats.lora_apply import apply_lora
    from dreambooth_min.formats.lora_file import load_lora, lora_state_dict, save_lora
    from dreambooth_min.formats.lora_names import kohya_unet_paths

    base = _sdxl_modules()
    loras = _trained_like(*copy.deepcopy(base))
    save_lora(tmp_path / "ours.safetensors", lora_state_dict(loras[0], loras[1], text_loras_2=loras[2],
                                                              unet_paths=kohya_unet_paths(base[0])))
    tensors, metadata = load_lora(tmp_path / "ours.safetensors")
    ours = [copy.deepcopy(m) for m in base]
    apply_lora(ours[0], ours[1], tensors, metadata=metadata, text_encoder_2=ours[2])
    pipe = _pipeline(*copy.deepcopy(base))
    pipe.load_lora_weights(str(tmp_path), weight_name="ours.safetensors")
    pipe.fuse_lora()
    theirs = _fused_weights(pipe)
    moved = _max_weight_diff(_our_weights(*ours), _our_weights(*base))
    assert moved > 1e-3  # the LoRA changes the weights
    assert _max_weight_diff(_our_weights(*ours), theirs) < 1e-6, "diffusers read our file differently"
    # The other way: diffusers' own SDXL format (peft adapters saved by save_lora_weights).
    pipe = _pipeline(*copy.deepcopy(base))
    pipe.load_lora_weights(str(tmp_path), weight_name="ours.safetensors", adapter_name="x")
    names = {"unet": "unet", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2"}
    kw = {f"{short}_lora_layers": get_peft_model_state_dict(getattr(pipe, name), adapter_name="x")
          for name, short in names.items()}
    kw |= {f"{short}_lora_adapter_metadata": getattr(pipe, name).peft_config["x"].to_dict()  # alpha lives here
           for name, short in names.items()}
    type(pipe).save_lora_weights(tmp_path, weight_name="peft.safetensors", **kw)
    tensors, metadata = load_lora(tmp_path / "peft.safetensors")
    assert any(k.startswith("text_encoder_2.") for k in tensors) and any(k.startswith("unet.") for k in tensors)
    again = [copy.deepcopy(m) for m in base]
    apply_lora(again[0], again[1], tensors, metadata=metadata, text_encoder_2=again[2])
    assert _max_weight_diff(_our_weights(*again), theirs) < 1e-6


def test_other_family_is_one_line():
    """An SD 1.x LoRA on SDXL and an SDXL LoRA on SD 1.x: one UserError naming both families; nothing changed."""
    import copy

    import pytest

    from dreambooth_min.errors import UserError
    from dreambooth_min.formats.lora_apply import apply_lora
    from dreambooth_min.formats.lora_file import lora_state_dict
    from tiny import make_pipeline

    unet, text, text_2 = _sdxl_modules()
    sd1 = make_pipeline("sd1")
    before = copy.deepcopy(_our_weights(unet, text, text_2))
    loras = _trained_like(copy.deepcopy(sd1.unet), copy.deepcopy(sd1.text_encoder), copy.deepcopy(text_2))
    sd1_file = lora_state_dict(loras[0], loras[1])
    with pytest.raises(UserError, match=r"^this LoRA was made for SD 1.x / 2.x, not for this SDXL model \(keys like "
                                        r"lora_te_text_model_encoder_layers_\d_self_attn_\w+\)$"):
        apply_lora(unet, text, sd1_file, text_encoder_2=text_2)
    assert _max_weight_diff(_our_weights(unet, text, text_2), before) == 0
    sdxl_file = lora_state_dict(*_trained_like(*_sdxl_modules())[:2], text_loras_2={})
    sdxl_file = {k.replace("lora_te_", "lora_te1_"): v for k, v in sdxl_file.items()}
    with pytest.raises(UserError, match=r"^this LoRA was made for SDXL, not for this SD 1.x / 2.x model \(keys like "
                                        r"lora_te1_"):
        apply_lora(copy.deepcopy(sd1.unet), copy.deepcopy(sd1.text_encoder), sdxl_file)


def test_vae_precision_defaults():
    """SDXL's VAE runs fp32 over an fp16 base (it overflows fp16); otherwise the base's precision or --vae-precision."""
    from dreambooth_min.run.hardware import Hardware

    fp16, bf16 = Hardware("cuda", "fp16"), Hardware("cuda", "bf16")
    assert fp16.vae_dtype("sdxl") == torch.float32 and fp16.vae_dtype("sd1") == torch.float16
    assert bf16.vae_dtype("sdxl") == torch.bfloat16
    assert fp16.vae_dtype("sdxl", "bf16") == torch.bfloat16 and fp16.vae_dtype("sdxl", "fp16") == torch.float16


# ---------------------------------------------------------------------------------------------------
# Training runs on a tiny random SDXL model (a diffusers folder with text_encoder_2/)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import sample  # noqa: E402
from test_training import config, synthetic_images  # noqa: E402

PROMPT = "a photo of sks dog"


@pytest.fixture(scope="module")
def tiny_xl(tiny_sdxl, tmp_path_factory):
    """The session's tiny SDXL (diffusers folder and sgm single file) and three photos."""
    return dict(tiny_sdxl, images=synthetic_images(tmp_path_factory.mktemp("sdxl_photos")))


def _xl_config(tmp_path, tiny, layout="folder", **kw):
    return config(tmp_path, tiny[layout], images=str(tiny["images"]), **kw)


def xl_denoising_loss(folder, lora, images_dir, resolution=32, seed=123):
    """Mean eps-MSE of the SDXL model (+ LoRA) on the photos at fixed noise and timesteps, each photo with its
    own size conditioning (as in training)."""
    from dreambooth_min import load
    from dreambooth_min.run.data import encode_latents
    from dreambooth_min.formats.lora_apply import apply_lora
    from dreambooth_min.formats.lora_file import load_lora
    from dreambooth_min.scheduler import add_noise

    sd = load(folder)
    if lora is not None:
        apply_lora(sd.unet, sd.text_encoder, load_lora(lora)[0], text_encoder_2=sd.text_encoder_2)
    images, _, _, sizes = load_instance_images(images_dir, resolution, "x", with_sizes=True)
    z0 = encode_latents(sd.vae, images)[0] * sd.vae.scaling_factor
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        cond = sd.encode_prompt([PROMPT] * len(z0)).with_time_ids(photo_time_ids(sizes, resolution))
        losses = []
        for t in (100, 300, 500, 700, 900):
            noise, tt = torch.randn(z0.shape, generator=g), torch.full((len(z0),), t)
            losses.append(((sd.unet(add_noise(z0, noise, tt), tt, cond) - noise) ** 2).mean().item())
    return sum(losses) / len(losses)


def test_sdxl_training_lowers_the_denoising_loss(tiny_xl, tmp_path):
    """LoRA and LoCon (the res blocks' convolutions: kohya's in_layers_2 / out_layers_3 names) on the tiny SDXL;
    measured 1.149 -> 0.719 in 50 steps (attention and MLP alone plateau at 1.00 on this 4 x 4-latent model)."""
    from dreambooth_min.formats.lora_file import load_lora
    from dreambooth_min.run.training import train

    cfg = _xl_config(tmp_path, tiny_xl, steps=50, lr=1e-2, prior_weight=0.0, rank=8, flip=False,
                     lora_targets=("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                                   "conv1", "conv2"))
    before = xl_denoising_loss(tiny_xl["folder"], None, cfg.images)
    result = train(cfg)
    after = xl_denoising_loss(tiny_xl["folder"], result["lora"], cfg.images)
    print(f"SDXL denoising loss {before:.4f} -> {after:.4f}")
    assert after < 0.8 * before, (before, after)
    names = load_lora(result["lora"])[0]
    assert "lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight" in names  # down_blocks.0.resnets.0.conv1
    assert "lora_unet_output_blocks_8_0_out_layers_3.lora_up.weight" in names  # up_blocks.2.resnets.2.conv2


def test_sdxl_resume_is_byte_identical_and_trains_both_text_encoders(tiny_xl, tmp_path):
    """The sgm single file, prior preservation (class images drawn by the frozen SDXL), --train-text-encoder: an
    interrupted and resumed run writes the same LoRA file, byte for byte, as an uninterrupted one; te1 and te2
    both learnt."""
    from dreambooth_min.formats.lora_file import load_lora
    from dreambooth_min.run.training import train

    kw = dict(steps=4, train_text_encoder=True, rank=2, class_dir=str(tmp_path / "class"), layout="single")
    a = train(_xl_config(tmp_path / "a", tiny_xl, **kw))
    cfg = _xl_config(tmp_path / "b", tiny_xl, **kw)
    assert train(cfg, stop_after=2)["interrupted"]
    b = train(cfg, resume=True)
    assert b["step"] == 4 and a["lora"].read_bytes() == b["lora"].read_bytes()
    tensors, meta = load_lora(a["lora"])
    # Every layer of each part learnt, but CLIP-L's last one: SDXL reads its penultimate states, so that layer
    # gets no gradient (bigG's last layer feeds the pooled vector, so it learns).
    last_te1 = "lora_te1_text_model_encoder_layers_2_"
    for part in ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_", "lora_te1_", "lora_te2_"):
        ups = [v for k, v in tensors.items() if k.startswith(part) and k.endswith("lora_up.weight")
               and not k.startswith(last_te1)]
        assert ups and all(v.abs().max() > 0 for v in ups), part
    assert all(v.abs().max() == 0 for k, v in tensors.items() if k.startswith(last_te1) and "lora_up" in k)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_sd_version"] == "sdxl"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert len(list((tmp_path / "class").glob("*.png"))) == 2


def _image(args, out):
    assert sample.main(args + ["--prompt", PROMPT, "--steps", "5", "--height", "32", "--width", "32", "--seed", "1",
                               "--out", str(out), "--no-progress"]) == 0
    return np.asarray(Image.open(out))


def _reference(pipe, lora_dir=None, name=None):
    import copy

    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(**{k: copy.deepcopy(v) for k, v in pipe.components.items()})
    if lora_dir is not None:
        pipe.load_lora_weights(str(lora_dir), weight_name=name)
    image = pipe(PROMPT, num_inference_steps=5, guidance_scale=7.5, height=32, width=32, output_type="np",
                 generator=[torch.Generator().manual_seed(1)]).images[0]
    return (image * 255).round().astype(np.uint8)


def test_trained_sdxl_lora_in_diffusers_gives_our_image(tiny_xl, tmp_path):
    """A LoRA trained here (UNet and both text encoders) loads in diffusers' StableDiffusionXLPipeline and gives
    sample.py's image within 2/255. Well-conditioned: the trained factors are small (lr 2e-3, 6 steps), and a
    1e-6 perturbation of them moves our image by at most 1/255."""
    from dreambooth_min.formats.lora_file import load_lora, save_lora
    from dreambooth_min.run.training import train

    lora = train(_xl_config(tmp_path, tiny_xl, steps=6, lr=2e-3, train_text_encoder=True, prior_weight=0.0))["lora"]
    ours = _image(["--model", str(tiny_xl["folder"]), "--lora", str(lora)], tmp_path / "ours.png")
    plain = _image(["--model", str(tiny_xl["folder"])], tmp_path / "plain.png")
    ref = _reference(tiny_xl["pipe"], lora.parent, lora.name)
    diff = np.abs(ours.astype(int) - ref)
    print(f"trained SDXL LoRA, ours vs diffusers: max |diff| {diff.max()}/255; the LoRA moves the image by "
          f"{np.abs(ours.astype(int) - plain).max()}/255")
    assert diff.max() <= 2 and ref.std() > 20
    assert np.abs(ours.astype(int) - plain).max() > 2 * diff.max() + 2  # the LoRA changed the picture
    tensors, meta = load_lora(lora)
    g = torch.Generator().manual_seed(0)
    save_lora(tmp_path / "nudged.safetensors", {k: v + 1e-6 * torch.randn(v.shape, generator=g) if "lora_" in k else v
                                                for k, v in tensors.items()}, meta)
    nudged = _image(["--model", str(tiny_xl["folder"]), "--lora", str(tmp_path / "nudged.safetensors")],
                    tmp_path / "nudged.png")
    assert np.abs(nudged.astype(int) - ours).max() <= 1


def test_sdxl_bad_inputs_are_one_line(tiny_xl, tiny_sd1, tmp_path, capsys):
    """An SD 1.x LoRA on SDXL and an SDXL LoRA on SD 1.x: exit 2 and one `error:` line naming both families."""
    import copy

    from dreambooth_min.formats.lora_file import lora_state_dict, save_lora
    from dreambooth_min.formats.lora_names import kohya_unet_paths

    base = _sdxl_modules()
    xl = _trained_like(*copy.deepcopy(base))
    save_lora(tmp_path / "xl.safetensors", lora_state_dict(xl[0], xl[1], text_loras_2=xl[2],
                                                           unet_paths=kohya_unet_paths(base[0])))
    sd1 = tiny_sd1["pipe"]
    sd1_loras = _trained_like(*[copy.deepcopy(m) for m in (sd1.unet, sd1.text_encoder, base[2])])
    save_lora(tmp_path / "sd1.safetensors", lora_state_dict(sd1_loras[0], sd1_loras[1]))
    for model, lora, message in ((tiny_xl["folder"], "sd1", "made for SD 1.x / 2.x, not for this SDXL model"),
                                 (tiny_sd1["folder"], "xl", "made for SDXL, not for this SD 1.x / 2.x model")):
        code = sample.main(["--model", str(model), "--lora", str(tmp_path / f"{lora}.safetensors"), "--prompt", "x",
                            "--out", str(tmp_path / "x.png"), "--no-progress", "--steps", "1"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "x.png").exists()
