"""LoRA: low-rank adapters on frozen Linear / Conv2d layers (LoCon), and their injection by module name.

LoRA (Hu et al. 2021, eq. 3) keeps the pretrained weight W frozen and learns a rank-r update:
    h = W x + (alpha / r) * B A x,   A = lora_down [r, in], B = lora_up [out, r]
B starts at zero, so training starts exactly at the base model; alpha / r keeps the update's size
roughly independent of the rank. A k x k convolution (LoCon, as kohya's sd-scripts / LyCORIS) gets a
k x k down factor with the base's stride and padding and a 1x1 up factor; the two convolutions compose
to one k x k convolution, so the merged weight is W + (alpha / r) * up[:, :, 0, 0] @ down.flatten(1),
reshaped to [out, in, k, k]. We select layers by the suffix of their module path ("to_q",
"to_out.0", "proj_in") and always say how many were wrapped: choosing by class name silently wraps
nothing when a model's classes differ.
The file format is in formats/: kohya names in lora_names.py, save and load in lora_file.py, apply in lora_apply.py.
"""
import math
import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UserError

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
# LoCon: the res blocks' convs and the resamplers' (kohya sd-scripts' conv_dim set; conv_in / conv_out may be added)
CONV_TARGETS = ("conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv")


def lora_delta(up, down, scale, shape):
    """scale * B A in fp32, reshaped to the base weight's shape ([out, in] or [out, in, k, k]).

    For a conv, B [out, r, 1, 1] after A [r, in, k, k] is one k x k conv of weight
    sum_j B[o, j] A[j, i, :, :], which is exactly this product reshaped (A's stride and padding are the base's).
    """
    return (scale * (up.flatten(1).float() @ down.flatten(1).float())).view(shape)


class LoRALinear(nn.Module):
    """y = base(x) + multiplier * (alpha / r) * up(down(x))  (LoRA eq. 3), base frozen.

    Wraps an nn.Linear, or a 1x1 nn.Conv2d (SD1's proj_in / proj_out), whose LoRA factors are then
    1x1 convs too, so their weights have kohya's 4-D shapes [r, in, 1, 1] / [out, r, 1, 1].
    """

    def __init__(self, base, rank=4, alpha=None, multiplier=1.0):
        super().__init__()
        n_in, n_out, make_down, make_up = self._factor_layers(base)
        self.base = base.requires_grad_(False)
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)  # kohya: a missing alpha means alpha = rank
        self.scale = self.alpha / rank
        self.multiplier = multiplier  # user strength; 0 disables, 1 = as trained
        # LoRA factors are kept in fp32 whatever the base's dtype: see _apply.
        self.lora_dtype = torch.float32
        w = base.weight
        self.lora_down = make_down(n_in, rank).to(w.device, self.lora_dtype)
        self.lora_up = make_up(rank, n_out).to(w.device, self.lora_dtype)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))  # as kohya / peft
        nn.init.zeros_(self.lora_up.weight)  # B = 0: the wrapped layer starts equal to the base
        self.merged = 0.0  # the factor currently folded into base.weight (0 = not merged)

    @staticmethod
    def _factor_layers(base):
        """(in, out, make_down, make_up) for `base`: Linear factors, or 1x1 convs for a 1x1 conv."""
        if isinstance(base, nn.Conv2d):
            if base.kernel_size != (1, 1) or base.stride != (1, 1) or base.padding != (0, 0) or base.groups != 1:
                raise ValueError(f"LoRALinear supports only 1x1 convolutions with stride 1, got {base}: use LoRAConv2d")
            make = lambda i, o: nn.Conv2d(i, o, 1, bias=False)
            return base.in_channels, base.out_channels, make, make
        if isinstance(base, nn.Linear):
            make = lambda i, o: nn.Linear(i, o, bias=False)
            return base.in_features, base.out_features, make, make
        raise ValueError(f"LoRA wraps nn.Linear or nn.Conv2d, got {type(base).__name__}")

    def _apply(self, fn, *args, **kwargs):
        # `unet.half()` / `.to(float16)` reach every parameter through _apply. fp16 LoRA weights would
        # get fp16 gradients, which GradScaler refuses ("Attempting to unscale FP16 gradients"), and
        # Adam's tiny updates would round away in fp16. So the factors follow device moves but are cast
        # back to lora_dtype; the frozen base takes whatever dtype it is given (autocast mixes them).
        super()._apply(fn, *args, **kwargs)
        for p in (self.lora_down.weight, self.lora_up.weight):
            if p.dtype != self.lora_dtype:
                p.data = p.data.to(self.lora_dtype)
                if p.grad is not None:
                    p.grad = p.grad.to(self.lora_dtype)
        return self

    def delta_weight(self):
        """(alpha / r) * B A, shaped like base.weight, in fp32."""
        return lora_delta(self.lora_up.weight, self.lora_down.weight, self.scale, self.base.weight.shape)

    def forward(self, x):
        y = self.base(x)
        if self.merged or self.multiplier == 0:
            return y
        # Outside autocast the fp32 factors need fp32 input; inside it, autocast casts again anyway.
        z = self.lora_up(self.lora_down(x.to(self.lora_dtype))).to(y.dtype)
        factor = self.multiplier * self.scale
        return y + z if factor == 1 else y + factor * z  # a multiply by 1 is a kernel launch (and one in backward)

    @torch.no_grad()
    def merge(self):
        """Fold multiplier * (alpha / r) * B A into base.weight: sampling then costs nothing extra."""
        if not self.merged:
            w = self.base.weight
            w.copy_((w.float() + self.multiplier * self.delta_weight()).to(w.dtype))
            self.merged = self.multiplier

    @torch.no_grad()
    def unmerge(self):
        """Subtract what merge() added (exact up to rounding in the base's dtype)."""
        if self.merged:
            w = self.base.weight
            w.copy_((w.float() - self.merged * self.delta_weight()).to(w.dtype))
            self.merged = 0.0

    def extra_repr(self):
        return f"rank={self.rank}, alpha={self.alpha:g}, multiplier={self.multiplier:g}"


class LoRAConv2d(LoRALinear):
    """LoCon: LoRA on a k x k nn.Conv2d (kohya sd-scripts `conv_dim`, LyCORIS "locon").

    down = Conv2d(in, r, k, base stride, base padding), up = Conv2d(r, out, 1): kohya's file shapes
    [r, in, k, k] / [out, r, 1, 1], read by A1111, ComfyUI and diffusers (peft's Conv2d LoRA has the same
    layout). Merging adds up[:, :, 0, 0] @ down.flatten(1) reshaped to [out, in, k, k] (lora_delta).
    """

    @staticmethod
    def _factor_layers(base):
        if not isinstance(base, nn.Conv2d):
            raise ValueError(f"LoRAConv2d wraps an nn.Conv2d, got {type(base).__name__}")
        if base.groups != 1 or base.dilation != (1, 1) or base.padding_mode != "zeros" or isinstance(base.padding, str):
            raise ValueError(f"LoRA supports convolutions with groups 1, dilation 1 and zero padding, got {base}")
        down = lambda i, o: nn.Conv2d(i, o, base.kernel_size, base.stride, base.padding, bias=False)
        up = lambda i, o: nn.Conv2d(i, o, 1, bias=False)
        return base.in_channels, base.out_channels, down, up


def fused_linear(layers, x):
    """[layer(x) for layer in layers] by one product with the concatenated base weights, and, for LoRA wrappers,
    one with the stacked down factors A and one with the block-diagonal up factors B (eq. 3 for all at once):
        [W_1; ...; W_n] x + f * blockdiag(B_1, ..., B_n) [A_1; ...; A_n] x.
    On a GPU each product is a kernel launch in an overhead-bound step: to_q/to_k/to_v take 3 launches instead of
    9, and as few in backward. The parameters stay those of each layer (names, file keys, gradients). Layers
    that do not fuse (a bias, merged, different ranks or factors, a LoCon) are called one by one."""
    first = layers[0]
    if all(type(m) is nn.Linear and m.bias is None for m in layers):
        return F.linear(x, torch.cat([m.weight for m in layers])).split([m.out_features for m in layers], dim=-1)
    factor = first.multiplier * first.scale if type(first) is LoRALinear else None
    if factor is None or not all(type(m) is LoRALinear and type(m.base) is nn.Linear and m.base.bias is None
                                 and not m.merged and m.multiplier * m.scale == factor and m.rank == first.rank
                                 for m in layers):
        return [m(x) for m in layers]
    y = F.linear(x, torch.cat([m.base.weight for m in layers]))
    if factor:
        a = F.linear(x.to(first.lora_dtype), torch.cat([m.lora_down.weight for m in layers]))  # [..., n r]
        z = F.linear(a, torch.block_diag(*(m.lora_up.weight for m in layers))).to(y.dtype)
        y = y + z if factor == 1 else torch.add(y, z, alpha=factor)
    return y.split([m.base.out_features for m in layers], dim=-1)


def lora_class(module):
    """The wrapper for `module`: LoRALinear for Linear and 1x1 stride-1 convs, LoRAConv2d for other convs."""
    if isinstance(module, nn.Conv2d) and (module.kernel_size != (1, 1) or module.stride != (1, 1)
                                          or module.padding != (0, 0)):
        return LoRAConv2d
    return LoRALinear


def _matches(name, targets):
    return any(name == t or name.endswith("." + t) for t in targets)


def unknown_targets(model, targets):
    """The targets that name no Linear or Conv2d layer of `model`, each with a near layer-name suffix (or
    None): a typo in one of several targets would otherwise train fewer layers without a word."""
    import difflib

    layers = [n for n, m in model.named_modules() if n and isinstance(m, (nn.Linear, nn.Conv2d))]
    suffixes = sorted({".".join(n.split(".")[-k:]) for n in layers for k in (1, 2, 3)})
    return [(t, next(iter(difflib.get_close_matches(t, suffixes, 1)), None)) for t in targets
            if not any(_matches(n, (t,)) for n in layers)]


def inject_lora(model, targets, rank=4, alpha=None, conv_rank=None, conv_alpha=None):
    """Replace every submodule whose dotted path ends with one of `targets` by a LoRA wrapper.

    Linear layers and 1x1 convs get rank `rank` and `alpha`; k x k convs (LoCon: `conv1`, `conv2`,
    `downsamplers.0.conv`, ...) get `conv_rank` / `conv_alpha`, by default `rank` / `alpha` (kohya's
    conv_dim / conv_alpha). alpha None means alpha = rank (scale 1).
    Returns {module path: wrapper}. Raises UserError if nothing matched (a silent zero-injection
    would train nothing and still "succeed").
    """
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    found = [(n, m) for n, m in model.named_modules() if n and _matches(n, targets)]
    if not found:
        raise UserError(f"LoRA targets {list(targets)} match no module of {type(model).__name__}")
    for name, module in found:
        if isinstance(module, LoRALinear):
            raise ValueError(f"{name} already has a LoRA")
    conv_rank = rank if conv_rank is None else conv_rank
    conv_alpha = alpha if conv_alpha is None else conv_alpha
    loras = {}
    for name, module in found:  # may raise: model untouched
        cls = lora_class(module)
        loras[name] = cls(module, rank, alpha) if cls is LoRALinear else cls(module, conv_rank, conv_alpha)
    for name, lora in loras.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, lora)
    return loras


def lora_parameters(*lora_dicts):
    """The trainable tensors (A and B of every wrapper), for the optimizer."""
    return [p for d in lora_dicts for m in d.values() for p in (m.lora_down.weight, m.lora_up.weight)]
