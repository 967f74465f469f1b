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
DoRA (Liu et al. 2024) rescales the adapted weight per channel: DoRALinear / DoRAConv2d below.
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

    def trainable(self):
        """The tensors training updates (DoRA adds its magnitudes)."""
        return [self.lora_down.weight, self.lora_up.weight]

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
        for p in self.trainable():
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


# DoRA: which axis of the weight [out, in(, k, k)] the magnitude runs along
DORA_AXES = {"out": 0, "in": 1}


def channel_norm(w, axis):
    """||w|| per output channel (axis "out": over each row's inputs and kernel) or per input channel ("in": over
    each column's outputs and kernel), shaped to broadcast against w: [out, 1, ...] or [1, in, ...]."""
    keep = DORA_AXES[axis]
    return torch.linalg.vector_norm(w, dim=[d for d in range(w.dim()) if d != keep], keepdim=True)


def dora_axis(magnitude, shape):
    """The axis of a magnitude shaped like channel_norm's result for a weight of `shape`: [out, 1, ...] is "out"."""
    return "out" if magnitude.shape[0] == shape[0] and magnitude.numel() == shape[0] else "in"


def dora_weight(w, delta, magnitude, strength=1.0):
    """DoRA's merged weight W + s (m (W + dW) / ||W + dW|| - W) in fp32 (eq. 5 at strength s: s = 0 is the base,
    s = 1 the DoRA, linear in between, as A1111 and ComfyUI apply a strength). `magnitude` is shaped like
    channel_norm's result, which tells its axis."""
    v = w.float() + delta
    direction = v / channel_norm(v, dora_axis(magnitude, w.shape))
    return w.float() + strength * (magnitude.float() * direction - w.float())


class DoRALinear(LoRALinear):
    """DoRA (Liu et al. 2024, eq. 5): W' = m (W + dW) / ||W + dW||, dW = (alpha / r) B A (LoRA's update).

    The direction (W + dW) / ||W + dW|| is normalised per channel and rescaled by a learnt magnitude m, one per
    output channel (axis "out", ||.|| over each row's inputs and kernel: peft, LyCORIS' default) or per input
    channel (axis "in", over each column's outputs and kernel: how A1111 and ComfyUI read the file best).
    m starts at the base weight's norms, and B at 0, so training starts exactly at the base model. The norm is
    detached (sec. 4.3): a constant in backward, which saves memory at a negligible cost in accuracy.
    A strength s != 1 gives W + s (W' - W), as in dora_weight. Stored as LyCORIS' `dora_scale` ([out, 1(, 1, 1)]
    or [1, in(, 1, 1)]): `magnitude` has that shape.
    """

    def __init__(self, base, rank=4, alpha=None, multiplier=1.0, axis="out"):
        super().__init__(base, rank, alpha, multiplier)
        self.axis = axis
        self.magnitude = nn.Parameter(channel_norm(base.weight.detach().float(), axis))

    def trainable(self):
        return super().trainable() + [self.magnitude]

    def gain(self):
        """m / ||W + dW|| per channel (norm detached, sec. 4.3), shaped to scale an activation's channel axis."""
        with torch.no_grad():
            norm = channel_norm(self.base.weight.float() + self.delta_weight(), self.axis)
        g = (self.magnitude / norm).flatten()
        return g.view(1, -1, 1, 1) if isinstance(self.base, nn.Conv2d) else g

    def forward(self, x):
        if self.merged or self.multiplier == 0:
            return self.base(x)
        g = self.gain()
        if self.axis == "in":  # W' x = (W + dW) (g x): the input channels scaled
            xs = x * g.to(x.dtype)
            z = self.scale * self.lora_up(self.lora_down(xs.to(self.lora_dtype)))
            dora = self.base(xs)
            dora = dora + z.to(dora.dtype)
            if self.multiplier == 1:
                return dora
            y = self.base(x)
        else:  # W' x = g (W x + dW x): the output channels scaled, the bias not
            y = self.base(x)
            bias = 0 if self.base.bias is None else self.base.bias.view(-1, *g.shape[2:])
            z = self.scale * self.lora_up(self.lora_down(x.to(self.lora_dtype)))
            dora = (g * (y - bias + z.to(y.dtype))).to(y.dtype) + bias
        return y + self.multiplier * (dora - y)

    @torch.no_grad()
    def merge(self):
        """W <- W + s (W' - W); the base weight is kept to unmerge (W' - W is not a function of W' alone)."""
        if not self.merged:
            w = self.base.weight
            self._unmerged = w.detach().clone()
            w.copy_(dora_weight(w, self.delta_weight(), self.magnitude, self.multiplier).to(w.dtype))
            self.merged = self.multiplier

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base.weight.copy_(self._unmerged)
            del self._unmerged
            self.merged = 0.0

    def extra_repr(self):
        return super().extra_repr() + f", dora={self.axis}"


class DoRAConv2d(DoRALinear):
    """DoRA on a k x k convolution: LoCon's factors (LoRAConv2d) under DoRALinear's magnitude."""
    _factor_layers = staticmethod(LoRAConv2d._factor_layers)


def lora_class(module, dora=None):
    """The wrapper for `module`: LoRALinear for Linear and 1x1 stride-1 convs, LoRAConv2d for other convs;
    with `dora` ("out" / "in") their DoRA versions."""
    conv = isinstance(module, nn.Conv2d) and (module.kernel_size != (1, 1) or module.stride != (1, 1)
                                              or module.padding != (0, 0))
    if dora:
        return DoRAConv2d if conv else DoRALinear
    return LoRAConv2d if conv else LoRALinear


def make_wrapper(module, rank, alpha, multiplier=1.0, dora=None):
    """lora_class(module, dora) around `module` (DoRA: on `dora`'s axis)."""
    cls = lora_class(module, dora)
    return cls(module, rank, alpha, multiplier, dora) if dora else cls(module, rank, alpha, multiplier)


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


def inject_lora(model, targets, rank=4, alpha=None, conv_rank=None, conv_alpha=None, dora=None):
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
        linear = lora_class(module) is LoRALinear
        loras[name] = make_wrapper(module, rank if linear else conv_rank, alpha if linear else conv_alpha, dora=dora)
    for name, lora in loras.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, lora)
    return loras


def lora_parameters(*lora_dicts):
    """The trainable tensors (A and B of every wrapper, DoRA's magnitudes), for the optimizer."""
    return [p for d in lora_dicts for m in d.values() for p in m.trainable()]
