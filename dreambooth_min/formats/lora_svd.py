"""LoRA updates by SVD: a LoRA resized to a lower rank, and a LoRA built from full weight differences (several
LoRAs summed into one, or a fine-tuned model minus its base).

Everything here is matrices and file keys; the model's side (which layer a key means, merging) is lora_merge.py.
A module's update dW = (alpha / r) B A, flattened to [out, in * k * k], has the SVD dW = U S V^T, and its best
rank-q approximation in the Frobenius norm is U_q S_q V_q^T (Eckart-Young). It is written as kohya sd-scripts
does (networks/resize_lora.py, extract_lora_from_models.py, svd_merge_lora.py): up B' = U_q S_q, down A' = V_q^T
(a k x k conv: A' [q, in, k, k], B' [out, q, 1, 1], LoCon); a resized module keeps its scale alpha / r, so
alpha' = q * alpha / r; an extracted or merged one has alpha' = q (scale 1).

Dynamic ranks are kohya's, exactly (so a file resized here and by resize_lora.py has the same ranks). Each picks
an index i from the singular values S (all min(out, in k k) of them), clamps it to [1, len(S) - 1], and keeps
q = i + 1 of them, at most the --rank given (a zero update gets q = 1):
    sv_ratio X:      i = #{s : s > s_1 / X}                      (keep those within a factor X of the largest)
    sv_cumulative X: i = 1 + first j with sum_{<=j} s / sum s >= X
    sv_fro X:        i = 1 + first j with sqrt(sum_{<=j} s^2 / sum s^2) >= X
(j counted from 0). The cumulative rules thus keep one singular value more than the fewest that reach X. Unlike
kohya, a resized module never grows past its old rank (the singular values beyond it are rounding noise).
"""
import torch
from tqdm import tqdm

from ..errors import UserError
from .lora_apply import _alpha, _peft_config
from .lora_file import kernel_size, module_groups
from .lora_names import kohya_name

DYNAMIC_METHODS = ("sv_fro", "sv_ratio", "sv_cumulative")
MIN_SV = 1e-6  # kohya's: a largest singular value below it is a zero update (rank 1)


def dynamic_index(s, method, value):
    """kohya's index_sv_ratio / index_sv_cumulative / index_sv_fro for singular values `s` (descending)."""
    if method == "sv_ratio":
        index = int((s > s[0] / value).sum())
    elif method in ("sv_cumulative", "sv_fro"):
        power = 1 if method == "sv_cumulative" else 2
        fractions = torch.cumsum(s.pow(power), 0) / float(s.pow(power).sum())
        index = int(torch.searchsorted(fractions, torch.tensor([value ** power], dtype=fractions.dtype))) + 1
    else:
        raise UserError(f"unknown dynamic rank method {method!r}: choose one of {', '.join(DYNAMIC_METHODS)}")
    return max(1, min(index, len(s) - 1))


def choose_rank(s, rank, method=None, value=None):
    """The rank kept of singular values `s`: `rank`, or the dynamic rule's (kohya rank_resize), at most `rank`."""
    new = rank if method is None else dynamic_index(s, method, value) + 1
    return 1 if s[0] <= MIN_SV else min(new, rank)


def kept_fraction(s, rank):
    """||U_q S_q V_q^T||_F / ||dW||_F = sqrt(sum_{i<q} s_i^2 / sum s_i^2): the Frobenius norm a rank-q SVD keeps."""
    total = float(s.pow(2).sum())
    return 1.0 if total == 0 else (float(s[:rank].pow(2).sum()) / total) ** 0.5


def factorize(delta, rank, method=None, value=None, clamp_quantile=1.0):
    """(down, up, kept rank, kept Frobenius fraction) of the full update `delta` ([out, in] or [out, in, k, k]):
    up @ down is its best rank-q approximation, q = choose_rank(...) capped at min(out, in k k).

    clamp_quantile < 1 clips both factors' entries at that quantile of their absolute values (kohya's extract and
    svd_merge default 0.99; 1 keeps the SVD exact)."""
    out = delta.shape[0]
    matrix = delta.float().reshape(out, -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    q = min(choose_rank(s, rank, method, value), len(s))
    up, down = u[:, :q] * s[:q], vh[:q]
    if clamp_quantile < 1:
        hi = torch.quantile(torch.cat([up.flatten(), down.flatten()]).abs(), clamp_quantile)
        up, down = up.clamp(-hi, hi), down.clamp(-hi, hi)
    if delta.dim() == 4:
        up, down = up.reshape(out, q, 1, 1), down.reshape(q, *delta.shape[1:])
    return down.contiguous(), up.contiguous(), q, kept_fraction(s, q)


def group_update(g, scale=1.0):
    """scale * B A of one file module (LoCon with lora_mid: the CP composition), full size, in fp32."""
    down, up, mid = g["down"].float(), g["up"].float(), g.get("mid")
    if mid is None:
        delta = up.flatten(1) @ down.flatten(1)
        return scale * delta.reshape(up.shape[0], *down.shape[1:])
    return scale * torch.einsum("r s k l, o r, s i -> o i k l", mid.float(), up.flatten(1), down.flatten(1))


def _kohya_key(part, name, style, sdxl):
    """A file module's kohya name: its own for a kohya file; built from the path for a peft / diffusers one."""
    if style == "kohya":
        return name
    return kohya_name(name, "te1" if sdxl and part == "te" else part)


def resize_lora(tensors, metadata, rank, conv_rank=None, method=None, value=None, progress=True):
    """A LoRA file's tensors at a lower rank, module by module (kohya resize_lora's rules, see the module docstring).

    Returns (tensors in kohya names with float32 alphas, rows (name, old rank, new rank, kept Frobenius fraction)).
    `conv_rank` (default `rank`) applies to k x k convolutions. Factors keep the file's dtype."""
    groups = module_groups(tensors)
    sdxl = any(part in ("te1", "te2") for part, _ in groups)
    out, rows = {}, []
    for (part, name), g in tqdm(sorted(groups.items()), desc="resize", disable=not progress):
        if not {"down", "up"} <= g.keys():
            raise UserError(f"LoRA module {name} lacks lora_down or lora_up weights")
        if g.keys() - {"down", "up", "alpha", "mid", "style"}:  # a DoRA's update depends on the base weight
            what = "a DoRA magnitude (dora_scale)" if "dora" in g else sorted(g.keys() - {"down", "up", "alpha", "mid"})
            raise UserError(f"LoRA module {name} has {what} besides its factors: resize takes LoRA / LoCon only "
                            "(merge --into-lora --model BASE makes a plain LoRA of any kind)")
        old = g["down"].shape[0]
        alpha = _alpha(g, _peft_config(metadata, part), name, old)
        conv = g.get("mid") is not None or kernel_size(g["down"]) != ()
        # A rank-r update has at most r singular values that are not rounding noise: never grow a module.
        limit = min((conv_rank or rank) if conv else rank, old)
        down, up, q, kept = factorize(group_update(g), limit, method, value)
        key = _kohya_key(part, name, g["style"], sdxl)
        out[key + ".lora_down.weight"] = down.to(g["down"].dtype)
        out[key + ".lora_up.weight"] = up.to(g["up"].dtype)
        out[key + ".alpha"] = torch.tensor(q * alpha / old, dtype=torch.float32)
        rows.append((key, old, q, kept))
    return out, rows


def lora_from_updates(updates, rank, conv_rank=None, clamp_quantile=1.0, progress=True, dtype=torch.float32,
                      device="cpu"):
    """A LoRA (kohya tensors, alpha = rank) from full updates {kohya name: dW}, each at `rank` (k x k convs:
    `conv_rank`, default `rank`), each SVD on `device`. Returns (tensors on the CPU, rows (name, full rank
    min(out, in k k), rank, kept fraction))."""
    out, rows = {}, []
    for key, delta in tqdm(sorted(updates.items()), desc="svd", disable=not progress):
        r = (conv_rank or rank) if kernel_size(delta) != () else rank
        down, up, q, kept = factorize(delta.to(device), r, clamp_quantile=clamp_quantile)
        out[key + ".lora_down.weight"], out[key + ".lora_up.weight"] = down.to("cpu", dtype), up.to("cpu", dtype)
        out[key + ".alpha"] = torch.tensor(float(q), dtype=torch.float32)
        rows.append((key, min(delta.shape[0], delta[0].numel()), q, kept))
    return out, rows
