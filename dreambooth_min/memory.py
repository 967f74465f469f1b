"""Training memory: keep only what backward needs.

DreamBooth-LoRA freezes every base weight, yet autograd keeps activations for gradients nobody asked for:
a convolution saves its input for a weight gradient, and GroupNorm -> SiLU -> conv keeps three tensors
where the input alone suffices. The helpers here keep only what backward needs; results are bit-identical,
and outside training (no grad) they are plain calls. Gradient checkpointing (`recompute_in_backward`)
goes further and keeps only a block's input.
"""
import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts, noop_context_fn


def _needs_graph(x):
    return torch.is_grad_enabled() and x.requires_grad


_CUDA_PATH = [False]  # cuda_code_path(): the CPU takes the CUDA code path (to count its ops without a GPU)


@contextlib.contextmanager
def cuda_code_path():
    """Inside, CPU tensors take the code path of CUDA ones: no convolution as GEMM (benchmarks.overhead)."""
    _CUDA_PATH.append(True)
    try:
        yield
    finally:
        _CUDA_PATH.pop()


def cpu_path(device):
    """Whether `device` takes the CPU-only paths, measured to help there (convolution as GEMM)."""
    return device.type == "cpu" and not _CUDA_PATH[-1]


_RECOMPUTE_CHEAP_OPS = [True]  # off inside a block that gradient checkpointing already recomputes whole


@contextlib.contextmanager
def whole_block_recomputed():
    """Inside a gradient-checkpointed block only the block's input is kept anyway: recomputing its cheap ops
    a second time (norm_silu, GEGLU) would only cost time."""
    _RECOMPUTE_CHEAP_OPS.append(False)
    try:
        yield
    finally:
        _RECOMPUTE_CHEAP_OPS.pop()


_LOW_MEMORY = [False]


@contextlib.contextmanager
def low_memory(on=True):
    """Inside (`--low-memory`), the cheap ops are recomputed on every device. Otherwise only on the CPU, where
    it was measured to pay (0.66 GiB saved for 0.07 s per SD 1.5 step, docs/benchmarks.md): on CUDA the step is
    overhead-bound, and each checkpoint adds Python and kernel launches to it (docs/gpu.md)."""
    _LOW_MEMORY.append(on or _LOW_MEMORY[-1])
    try:
        yield
    finally:
        _LOW_MEMORY.pop()


def recompute_cheap_ops(x):
    return _RECOMPUTE_CHEAP_OPS[-1] and _needs_graph(x) and (_LOW_MEMORY[-1] or cpu_path(x.device))


def _gemm_wins(x_shape, device, weight, stride):
    """Whether a plain matrix product beats oneDNN for this convolution (CPU only).

    oneDNN copies the whole weight into its blocked layout on every call. At the deep, low-resolution
    levels (1280 channels at 8x8) that copy moves more bytes than the arithmetic needs time, while a GEMM
    reads the weight as stored: measured 2x faster there, and as fast for every 1x1 convolution. At high
    resolution oneDNN's direct kernels are faster than im2col + GEMM, so they keep those."""
    out_channels, _, kh, kw = weight.shape
    if not cpu_path(device) or len(x_shape) != 4 or out_channels < 64:
        return False
    if kh == kw == 1 and stride == (1, 1):
        return True
    pixels = x_shape[0] * (x_shape[2] // stride[0]) * (x_shape[3] // stride[1])  # output pixels
    return 2 * pixels <= out_channels


def _conv2d_gemm(x, weight, bias, stride, padding):
    """conv2d as one GEMM: W [O, C*k*k] @ im2col(x) [B, C*k*k, L] (a 1x1 convolution needs no im2col)."""
    B, C, H, W = x.shape
    O, _, kh, kw = weight.shape
    Ho, Wo = (H + 2 * padding[0] - kh) // stride[0] + 1, (W + 2 * padding[1] - kw) // stride[1] + 1
    if (kh, kw) == (1, 1) and padding == (0, 0) and x.is_contiguous(memory_format=torch.channels_last) \
            and not x.is_contiguous():
        # pixels-major input (a transformer's tokens viewed as an image): stay pixels-major, no copy
        out = F.linear(x.permute(0, 2, 3, 1).reshape(B, H * W, C), weight.view(O, C), bias)
        return out.view(B, Ho, Wo, O).permute(0, 3, 1, 2)
    if (kh, kw) == (1, 1) and padding == (0, 0):
        cols = x[:, :, ::stride[0], ::stride[1]].reshape(B, C, Ho * Wo)
    else:
        cols = F.unfold(x, (kh, kw), padding=padding, stride=stride)
    out = torch.matmul(weight.view(O, -1), cols)  # [B, O, Ho*Wo]
    if bias is not None:
        out += bias[:, None]
    return out.view(B, O, Ho, Wo)


def conv2d(x, weight, bias, stride, padding):
    """F.conv2d (groups 1, dilation 1, zero padding), by oneDNN or by GEMM, whichever is faster here."""
    if _gemm_wins(x.shape, x.device, weight, stride):
        return _conv2d_gemm(x, weight, bias, stride, padding)
    return F.conv2d(x, weight, bias, stride, padding)


def conv2d_input_grad(x_shape, weight, grad, stride, padding):
    """d loss / d x of conv2d(x, weight): the transposed convolution, by GEMM + col2im when that wins."""
    if not _gemm_wins(x_shape, grad.device, weight, stride):
        return torch.nn.grad.conv2d_input(x_shape, weight, grad, stride, padding)
    B, C, H, W = x_shape
    O, _, kh, kw = weight.shape
    cols = torch.matmul(weight.view(O, -1).t(), grad.reshape(B, O, -1))  # [B, C*k*k, L]
    if (kh, kw) == (1, 1) and padding == (0, 0) and stride == (1, 1):
        return cols.view(x_shape)
    return F.fold(cols, (H, W), (kh, kw), padding=padding, stride=stride)


class _FrozenConv2d(torch.autograd.Function):
    """conv2d with a weight and bias that get no gradient: backward needs the weight, not the input."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        out = conv2d(x, weight, bias, stride, padding)
        ctx.save_for_backward(weight)
        ctx.x_shape, ctx.x_dtype, ctx.stride, ctx.padding = x.shape, x.dtype, stride, padding
        return out

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        dx = conv2d_input_grad(ctx.x_shape, weight.to(grad.dtype), grad, ctx.stride, ctx.padding)
        return dx.to(ctx.x_dtype), None, None, None, None


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters, same names) that does not keep its input when its weights are frozen,
    and picks the faster of oneDNN and GEMM on the CPU (`conv2d`)."""

    def forward(self, x):
        if self.dilation != (1, 1) or self.groups != 1 or self.padding_mode != "zeros" or isinstance(self.padding, str):
            return super().forward(x)
        frozen = not self.weight.requires_grad and (self.bias is None or not self.bias.requires_grad)
        if not frozen and torch.is_grad_enabled():
            return super().forward(x)  # full fine-tuning: autograd's own convolution gives the weight gradient
        weight, bias = self.weight, self.bias
        if torch.is_autocast_enabled(x.device.type):  # the cast autocast would have made for F.conv2d
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight, bias = x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
        if _needs_graph(x):
            return _FrozenConv2d.apply(x, weight, bias, self.stride, self.padding)
        return conv2d(x, weight, bias, self.stride, self.padding)


def _norm_silu(norm, x):
    return F.silu(norm(x))


def norm_silu(norm, x):
    """SiLU(norm(x)). In training only x is kept: the two cheap ops are redone in backward instead of keeping
    the norm's output (SiLU's input) and SiLU's output (the next conv's input)."""
    return recompute_cheap(lambda h: _norm_silu(norm, h), x)


def recompute_cheap(fn, x):
    """fn(x), keeping only x in training: fn's intermediate tensors are redone in backward."""
    return checkpoint(fn, x, use_reentrant=False) if recompute_cheap_ops(x) else fn(x)


def recompute_in_backward(module, *args, keep_attention=False):
    """Gradient checkpointing of one block: only its input is kept, the rest is redone in backward.

    With `keep_attention` the attention kernel's result is kept too: one activation, and the most
    expensive part of a transformer block to recompute (quadratic in the pixels)."""
    context_fn = _keep_attention if keep_attention else noop_context_fn
    return checkpoint(_whole, module, *args, use_reentrant=False, context_fn=context_fn)


def _whole(module, *args):
    with whole_block_recomputed():
        return module(*args)


_ATTENTION_OPS = {getattr(torch.ops.aten, name).default for name in (
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
    if hasattr(torch.ops.aten, name)}


def _attention_policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _keep_attention():
    return create_selective_checkpoint_contexts(_attention_policy)
