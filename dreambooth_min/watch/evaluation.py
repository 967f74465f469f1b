"""Subject fidelity as the DreamBooth paper measures it (Ruiz et al. 2023, sec. 4.1 and Table 1).

With e_dino(x) the CLS embedding of DINO ViT-S/16 (self-supervised; it tells apart two dogs of one breed,
which CLIP tends to merge), e_img / e_txt CLIP's projected image / text embeddings, G the generated
images, R the real subject photos and cos the cosine similarity:

    DINO   = mean over (g, r) in G x R of cos(e_dino(g), e_dino(r))      subject fidelity, the paper's preferred one
    CLIP-I = the same with e_img                                           subject fidelity
    CLIP-T = mean over g in G of cos(e_txt(prompt), e_img(g))              prompt fidelity, a cosine (paper: 0.305;
                                                                           the "CLIP score" of other papers is 100x)
    PRES   = DINO between the fine-tuned model's images of the plain class prompt ("a photo of dog") and R:
             lower = the class drifted less towards the subject (prior preservation, paper sec. 4.3)
    DIV    = 1 - mean over g != g' in G of cos(e_dino(g), e_dino(g')), among the images of one prompt.
             The paper's DIV is 1 - LPIPS similarity; LPIPS needs weights transformers does not ship, so
             ours is the DINO analogue: 0 = all images look alike, higher = more varied. Not comparable
             with the paper's numbers, only between our own runs.
    DINO-NN (extra, not in the paper) = mean over g of max over r of cos(e_dino(g), e_dino(r)): how close
             each image is to its nearest training photo. It reaches 1 when images copy a photo.

"Pairwise" is over all pairs, so a set scored against itself gets less than 1 unless all its images are
one image: for the paper's real photos DINO is 0.774 and CLIP-I 0.885.

Here is only the math: embeddings [N, D] in, Python floats out, all in fp32; and `best_epoch`, the rule
that picks an epoch from a table of these scores. The models that make the embeddings are evaluators.py's,
their image preprocessing preprocess.py's, the run folder's reading finished_run.py's and metrics.png
plots.py's.
"""
import math

CLIP_T_MARGIN = 0.01  # best-epoch rule: CLIP-T may lose at most this much (absolute cosine) to its maximum
METRICS = ("dino", "clip_i", "clip_t", "pres", "div", "dino_nn")


# ---------------------------------------------------------------------------------------------------
# Metric math: embeddings [N, D] in, Python floats out

def normalize(x, eps=1e-12):
    """Rows scaled to unit length, in fp32."""
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def cosine_matrix(a, b):
    """[Na, Nb] cosines between the rows of a and of b."""
    return normalize(a) @ normalize(b).T


def mean_pairwise_cosine(a, b):
    """Mean cosine over all Na x Nb pairs (a row of a with a row of b)."""
    if len(a) == 0 or len(b) == 0:
        raise ValueError("mean_pairwise_cosine needs at least one row in each set")
    return cosine_matrix(a, b).mean().item()


def mean_cosine_within(a):
    """Mean cosine over the N (N - 1) ordered pairs of distinct rows of a (the diagonal left out)."""
    n = len(a)
    if n < 2:
        raise ValueError("mean_cosine_within needs at least two rows")
    c = cosine_matrix(a, a)
    return ((c.sum() - c.diagonal().sum()) / (n * (n - 1))).item()


def dino_score(generated, real):
    """DINO: mean pairwise cosine of generated and real DINO embeddings (paper sec. 4.1)."""
    return mean_pairwise_cosine(generated, real)


def clip_i_score(generated, real):
    """CLIP-I: mean pairwise cosine of generated and real CLIP image embeddings."""
    return mean_pairwise_cosine(generated, real)


def clip_t_score(image_embeddings, text_embeddings):
    """CLIP-T: mean cosine of each image's CLIP embedding with its prompt's ([1, D] for one prompt
    shared by all images, or one row per image). A cosine in [-1, 1], as the paper's 0.305."""
    if len(text_embeddings) not in (1, len(image_embeddings)):
        raise ValueError(f"{len(text_embeddings)} prompt embeddings for {len(image_embeddings)} images")
    return (normalize(image_embeddings) * normalize(text_embeddings)).sum(-1).mean().item()


def pres_score(class_generated, real):
    """PRES: DINO between the fine-tuned model's plain-class images and the real subject (lower = less drift)."""
    return mean_pairwise_cosine(class_generated, real)


def div_score(generated):
    """DIV (our DINO version, see the module docstring): 1 - mean DINO cosine among images of one prompt."""
    return 1.0 - mean_cosine_within(generated)


def nearest_real_score(generated, real):
    """DINO-NN: mean over generated images of the cosine to the nearest real image (1 = copies)."""
    return cosine_matrix(generated, real).max(dim=1).values.mean().item()


# ---------------------------------------------------------------------------------------------------
# Best epoch

def best_epoch(records, margin=CLIP_T_MARGIN):
    """The record with the highest DINO among those whose CLIP-T is within `margin` of the best CLIP-T.

    Why: DINO alone keeps rising while the model learns to copy the photos, and the prompt is then
    ignored (CLIP-T falls). The earliest epoch wins a tie. None when no record has both numbers.
    """
    rows = [r for r in records if finite(r.get("dino")) and finite(r.get("clip_t"))]
    if not rows:
        return None
    top = max(r["clip_t"] for r in rows)
    allowed = [r for r in rows if r["clip_t"] >= top - margin]
    return max(allowed, key=lambda r: (r["dino"], -r["epoch"]))


def finite(x):
    """A real number that is neither NaN nor infinite (a record's missing or failed score is not)."""
    return isinstance(x, (int, float)) and math.isfinite(x)

