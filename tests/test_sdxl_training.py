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


# ---------------------------------------------------------------------------------------------------
# The LoRA file: kohya's SDXL names, read by diffusers; others' SDXL files read by us; families refused

def _sdxl_modules(seed=0):
    """A tiny diffusers SDXL UNet (no attention at level 0, 1 then 2 transformer blocks, text_time) and its two
    text encoders (CLIPTextModel, CLIPTextModelWithProjection), seeded random, fp32, eval mode."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from tiny import SD1_TEXT, _randomize

    g = torch.Generator().manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=2, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), cross_attention_dim=64,
        transformer_layers_per_block=(1, 2), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=32)
    text = CLIPTextModel(CLIPTextConfig(**SD1_TEXT))
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**dict(SD1_TEXT, pad_token_id=0, hidden_act="gelu",
                                                               projection_dim=32)))
    for m in (unet, text, text_2):
        _randomize(m, g)
        m.eval()
    return unet, text, text_2


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

    from dreambooth_min.lora_file import kohya_unet_paths, lora_state_dict

    unet, text, text_2 = _sdxl_modules()
    paths = kohya_unet_paths(unet)
    loras = _trained_like(copy.deepcopy(unet), copy.deepcopy(text), copy.deepcopy(text_2))
    tensors = lora_state_dict(loras[0], loras[1], text_loras_2=loras[2], unet_paths=paths)
    names = {k.split(".")[0] for k in tensors}
    # down_blocks.1 is LDM level 1: input_blocks 4 and 5 (k = 1 + 3 * level + j); up_blocks.0 = output_blocks 0-2
    for name in ("lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k",
                 "lora_unet_input_blocks_5_1_transformer_blocks_0_attn1_to_out_0",
                 "lora_unet_middle_block_1_transformer_blocks_1_attn1_to_q",
                 "lora_unet_output_blocks_2_1_transformer_blocks_0_attn2_to_v",
                 "lora_te1_text_model_encoder_layers_1_self_attn_q_proj",
                 "lora_te2_text_model_encoder_layers_0_self_attn_out_proj"):
        assert name in names, name
    assert not any(n.startswith(("lora_unet_down_blocks", "lora_unet_mid_block", "lora_unet_up_blocks", "lora_te_"))
                   for n in names)
    assert len(names) == len(loras[0]) + len(loras[1]) + len(loras[2])
    assert tensors["lora_te2_text_model_encoder_layers_0_self_attn_out_proj.alpha"].item() == 3.0


def _pipeline(unet, text, text_2):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    from tiny import TOKENIZER_DIR, VAE

    tokenizers = [CLIPTokenizer(str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"), pad_token=pad,
                                model_max_length=77) for pad in ("<|endoftext|>", "!")]
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionXLPipeline(vae=AutoencoderKL(**VAE, scaling_factor=0.13025), text_encoder=text,
                                     text_encoder_2=text_2, tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=unet,
                                     scheduler=scheduler)


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

    from dreambooth_min.lora_file import apply_lora, kohya_unet_paths, load_lora, lora_state_dict, save_lora

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
    from dreambooth_min.lora_file import apply_lora, lora_state_dict
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
    from dreambooth_min.hardware import Hardware

    fp16, bf16 = Hardware("cuda", "fp16"), Hardware("cuda", "bf16")
    assert fp16.vae_dtype("sdxl") == torch.float32 and fp16.vae_dtype("sd1") == torch.float16
    assert bf16.vae_dtype("sdxl") == torch.bfloat16
    assert fp16.vae_dtype("sdxl", "bf16") == torch.bfloat16 and fp16.vae_dtype("sdxl", "fp16") == torch.float16
