"""Every setting of a training run, declared once: name, type, default and a one-line help.

train.py builds its command line from these fields (cli.py); config.json stores them; `check` validates
them before any slow work. A bad value raises SettingError, which names the setting: the library says
"rank must be positive", the command line says "--rank must be positive".
"""
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SettingError, UserError
from ..lora import UNET_TARGETS
from ..scheduler import PREDICTION_TYPES
from ..watch.evaluators import CLIP_MODEL, DINO_MODEL
from .hardware import DTYPES
from .optim import DEFAULT_LR
from .pivotal import check_tokens


def option(default, help, group, **argparse_extras):
    """A dataclass field with what the command line needs: its help line and its --help group."""
    return field(default=default, metadata=dict(help=help, group=group, **argparse_extras))


SUBJECT, PRIOR, LORA, OPTIM, HARDWARE, OUTPUTS = ("what to learn", "prior preservation (DreamBooth eq. 2)", "LoRA",
                                                 "optimisation", "hardware", "outputs")


@dataclass
class TrainConfig:
    images: str = option("", "a folder of 3-10 photos of the subject (jpg/png/webp/bmp/tiff; "
                             "name.txt beside name.jpg = its caption)", SUBJECT, metavar="FOLDER")
    class_noun: str = option("person", "what the subject is, e.g. dog, girl, backpack: the prior's class", SUBJECT)
    prompt: str = option("a photo of {token} {class_noun}", "instance prompt; {token} (sks) is the rare token that "
                         "comes to mean your subject", SUBJECT)
    token: str = option("", "the subject's identifier, {token} in the prompts (default: sks; with --pivotal the "
                            "new tokens <s0><s1>)", SUBJECT)
    model: str = option("", "a .safetensors file, a diffusers folder, a Hub repo id (owner/name or "
                            "owner/name/file.safetensors) or sd15 / sd21 / sd21-base / sdxl (default: the one model in "
                            "weights/, else sd15 from the Hub)", SUBJECT, metavar="MODEL")
    revision: str = option("", "branch, tag or commit of a Hub --model (default: main; a resumed run uses the "
                               "commit it started with)", SUBJECT)
    prediction_type: str = option("", "override the detected prediction type", SUBJECT,
                                  choices=PREDICTION_TYPES)
    resolution: int = option(0, "training size in pixels (0: 512 for SD 1.x and 2.x-base, 768 for SD 2.x "
                                "v-models, 1024 for SDXL)", SUBJECT)
    flip: bool = option(True, "no random horizontal flips: for asymmetric subjects (text, logos)", SUBJECT)
    aspect_buckets: bool = option(False, "train photos of any shape whole, resized into buckets of about "
                                         "--resolution^2 pixels (sides multiples of 64), not centre-cropped", SUBJECT)
    masks: str = option("", "a folder of loss masks, DIR/name.png (or name.mask.png) for name.jpg: white is learnt, "
                            "black ignored (default: name.mask.png beside a photo, if any)", SUBJECT, metavar="DIR")

    prior_weight: float = option(1.0, "lambda, the weight of the class-image loss; 0 (or --no-prior) trains on "
                                      "the subject's photos alone", PRIOR, alias=("--no-prior", 0.0))
    class_prompt: str = option("a photo of {class_noun}", "prompt of the class images", PRIOR)
    num_class_images: int = option(100, "class images drawn by the base model", PRIOR)
    class_dir: str = option("", "where class images are kept and reused (default: "
                                "class_images/<model>/<prompt>-<resolution>)", PRIOR)
    class_steps: int = option(30, "DDIM steps per class image", PRIOR)

    rank: int = option(4, "LoRA rank r", LORA)
    alpha: float = option(0.0, "LoRA alpha; scale = alpha / rank (0: = rank, scale 1)", LORA)
    lora_targets: tuple = option(UNET_TARGETS, "UNet layers to adapt, by module-name suffix, comma-separated; "
                                 "also e.g. proj_in, proj_out, ff.net.0.proj, ff.net.2", LORA)
    train_text_encoder: bool = option(False, "also adapt the text encoder's attention (q/k/v/out_proj; SDXL: of both "
                                             "encoders)", LORA)
    conv_rank: int = option(0, "rank of LoRA on convolutions named in --lora-targets (LoCon: conv1, conv2, ...); "
                               "0: = --rank", LORA)
    conv_alpha: float = option(0.0, "alpha of the convolution LoRA (0: = --alpha)", LORA)
    pivotal: bool = option(False, "pivotal tuning: also learn new tokens' embeddings (--token, default <s0><s1>, "
                                  "initialised from --class-noun's), written apart to embedding.safetensors", LORA)
    dora: str = option("", "DoRA (Liu et al. 2024): learn a magnitude per output channel (--dora, as peft), or per "
                           "input channel (--dora in: as A1111 and ComfyUI read it exactly); see docs/dora-and-ema.md",
                       LORA, choices=("out", "in"), nargs="?", const="out")

    epochs: int = option(300, "passes over the instance images", OPTIM)
    steps: int = option(0, "optimizer steps; overrides --epochs when > 0", OPTIM)
    lr: float = option(0.0, "learning rate of the LoRA factors (0: 1e-4 for adamw; 1.0 for prodigy, where it "
                            "multiplies the step size Prodigy estimates)", OPTIM)
    text_encoder_lr: float = option(0.0, "learning rate of the text-encoder LoRA (0: = --lr)", OPTIM)
    embedding_lr: float = option(0.0, "learning rate of the new token embeddings with --pivotal (0: = --lr)", OPTIM)
    lr_schedule: str = option("constant", "learning-rate schedule after the linear warmup", OPTIM,
                              choices=("constant", "cosine"), flags=("--lr-schedule", "--lr-scheduler"))
    warmup_steps: int = option(0, "linear warmup steps", OPTIM)
    weight_decay: float = option(1e-2, "decoupled weight decay (AdamW's; Prodigy's too)", OPTIM)
    optimizer: str = option("adamw", "adamw; adamw8bit (bitsandbytes, CUDA: less optimizer memory); prodigy "
                                     "(prodigyopt: estimates its own step size)", OPTIM,
                            choices=("adamw", "adamw8bit", "prodigy"))
    prodigy_d_coef: float = option(1.0, "Prodigy's d_coef: scales its estimated step size (0.5-2)", OPTIM)
    batch_size: int = option(1, "instance images per step; as many class images are added", OPTIM)
    grad_accum: int = option(1, "micro-batches per optimizer step", OPTIM)
    max_grad_norm: float = option(1.0, "gradient clipping", OPTIM)
    snr_gamma: float = option(0.0, "min-SNR-gamma loss weighting (Hang et al. 2023), e.g. 5; 0 disables", OPTIM)
    offset_noise: float = option(0.0, "offset-noise strength, e.g. 0.05; 0 disables", OPTIM)
    seed: int = option(0, "seed of every random draw", OPTIM)
    ema_decay: float = option(0.0, "keep an exponential moving average of the LoRA with this decay, e.g. 0.999; "
                                   "validation and lora.safetensors use it, lora_raw.safetensors keeps the last "
                                   "step's; 0 disables", OPTIM)

    device: str = option("", "cuda or cpu (default: cuda if available)", HARDWARE)
    precision: str = option("", "fp16 = frozen fp16 base + autocast + GradScaler (default on CUDA; on the CPU "
                                "for testing only, slow); bf16; fp32 (default on the CPU)", HARDWARE,
                            choices=tuple(DTYPES))
    gradient_checkpointing: bool = option(False, "recompute activations in backward: less memory, ~30%% slower",
                                          HARDWARE)
    vae_precision: str = option("", "precision of the VAE's encoding and decoding (default: the base's, but fp32 for "
                                    "SDXL over an fp16 base: SDXL's VAE overflows fp16 into NaN / black images)",
                                HARDWARE, choices=tuple(DTYPES))
    low_memory: bool = option(False, "recompute GroupNorm+SiLU and GEGLU in backward on CUDA too (always on the CPU, "
                                     "where it pays): less activation memory, slower on a GPU", HARDWARE)
    compile: bool = option(False, "torch.compile the UNet (CUDA graphs on CUDA); the first step includes compiling "
                                  "(minutes for SD at full size)", HARDWARE)

    output: str = option("", "run folder (default: runs/<timestamp>)", OUTPUTS)
    save_every: int = option(250, "checkpoint every N steps and on Ctrl-C; 0: only on Ctrl-C (a finished run keeps "
                                  "lora.safetensors, not its checkpoints)", OUTPUTS)
    keep_checkpoints: int = option(2, "how many checkpoints to keep", OUTPUTS)
    validate_every: int = option(50, "sample the validation prompt every N epochs; 0 disables", OUTPUTS)
    validation_prompt: str = option("{prompt} in the snow", "what validation draws ({prompt}: the instance prompt)",
                                    OUTPUTS)
    validation_images: int = option(4, "images per validation, fixed seeds", OUTPUTS)
    validation_steps: int = option(30, "DDIM steps per validation image", OUTPUTS)
    report_to: str = option("", "also log to a tracker: tensorboard or wandb (optional packages)", OUTPUTS,
                            choices=("tensorboard", "wandb"))
    eval_every: int = option(0, "every N epochs, score the validation images with DINO, CLIP-I, CLIP-T (and PRES) "
                                "as the DreamBooth paper does -> metrics.jsonl; 0 disables", OUTPUTS)
    keep_best: bool = option(False, "with --eval-every: keep the LoRA of the best epoch as lora_best.safetensors",
                             OUTPUTS)
    clip_model: str = option(CLIP_MODEL, "CLIP for CLIP-I / CLIP-T: Hub id or folder", OUTPUTS)
    dino_model: str = option(DINO_MODEL, "DINO ViT-S/16 for DINO / PRES: Hub id or folder", OUTPUTS)

    def is_validation_epoch(self, epoch):
        """Validation images are drawn every --validate-every epochs, and every --eval-every epochs to score."""
        return any(every and epoch % every == 0 for every in (self.validate_every, self.eval_every))

    def resolved_prompts(self):
        """(instance, class, validation) prompts with {class_noun}, {token} and {prompt} filled in."""
        words = dict(class_noun=self.class_noun, token=self.resolved_token())
        prompt = _fill("prompt", self.prompt, **words)
        return prompt, _fill("class_prompt", self.class_prompt, **words), \
            _fill("validation_prompt", self.validation_prompt, prompt=prompt, **words)

    def resolved_token(self):
        """The identifier {token}: --token, else sks (DreamBooth's rare token), or with --pivotal <s0><s1>."""
        return self.token or ("<s0><s1>" if self.pivotal else "sks")

    def check(self):
        """Raise SettingError for a setting that cannot train anything (before any slow work)."""
        self.lr = self.lr or DEFAULT_LR.get(self.optimizer, DEFAULT_LR["adamw"])  # config.json records the rate used
        positive = ["rank", "batch_size", "grad_accum", "lr", "class_steps", "prodigy_d_coef"] + ["epochs"] * (not self.steps)
        if self.validate_every or self.eval_every:
            positive += ["validation_images", "validation_steps"]
        for name in positive:
            if not getattr(self, name) > 0:
                raise SettingError(name, f"must be positive, not {getattr(self, name)}")
        for name in ("steps", "num_class_images", "prior_weight", "warmup_steps", "validate_every", "save_every", "eval_every",
                     "conv_rank", "conv_alpha", "embedding_lr",
                     "snr_gamma", "offset_noise", "alpha", "resolution"):
            if getattr(self, name) < 0:
                raise SettingError(name, f"must not be negative, not {getattr(self, name)}")
        if not 0 <= self.ema_decay < 1:
            raise SettingError("ema_decay", f"must be at least 0 and below 1, not {self.ema_decay}")
        if self.resolution % 8:
            raise SettingError("resolution", f"must be a multiple of 8, not {self.resolution}")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices + ("",):
                raise SettingError(f.name, f"must be one of {', '.join(choices)}, not {getattr(self, f.name)!r}")
        self.resolved_prompts()
        self._check_prodigy_and_pivotal()

    def _check_prodigy_and_pivotal(self):
        if self.optimizer == "prodigy":
            for name in ("text_encoder_lr", "embedding_lr"):
                if getattr(self, name) not in (0, self.lr):
                    raise SettingError(name, "cannot differ from --lr with --optimizer prodigy: it estimates one step "
                                             "size for all parameters (leave it out)")
        if self.pivotal:
            problem = check_tokens(self.resolved_token(), self.resolved_prompts()[0])
            if problem:
                raise SettingError("token", problem)

    def schedule_length(self, n_images, bucket_sizes=None):
        """(micro-batches per epoch, optimizer steps in the run) for `n_images` photos; with --aspect-buckets
        each batch comes from one bucket, and `bucket_sizes` are the photos in each."""
        micro_per_epoch = sum(math.ceil(n / min(self.batch_size, n)) for n in bucket_sizes or [n_images])
        return micro_per_epoch, self.steps or math.ceil(self.epochs * micro_per_epoch / self.grad_accum)

    @property
    def use_prior(self):
        return self.prior_weight > 0 and self.num_class_images > 0


def _fill(name, template, **values):
    try:
        return template.format(**values)
    except (KeyError, IndexError, ValueError) as e:
        raise SettingError(name, f"has an unknown placeholder {e}: only {{{'}, {'.join(values)}}} are filled "
                                 "in; write literal braces as {{ }}") from None


def config_from_json(path):
    """The TrainConfig saved in a run's config.json (for --resume); fields it lacks keep their defaults."""
    try:
        saved = json.loads(Path(path).read_text())["config"]
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"cannot read the run's configuration {path}: {e}") from None
    if not isinstance(saved, dict):
        raise UserError(f"the run's configuration {path} is damaged: its \"config\" is not an object")
    saved.setdefault("lr_schedule", saved.pop("lr_scheduler", "constant"))  # the name before 0.2
    fields = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in fields}
    for name, value in values.items():
        kind = fields[name] if isinstance(fields[name], str) else fields[name].__name__
        if not _has_type(value, kind):
            raise UserError(f"the run's configuration {path} is damaged: {name} must be {TYPE_NAMES[kind]}, "
                            f"not {value!r}")
    return TrainConfig(**values)


TYPE_NAMES = {"str": "text", "int": "a whole number", "float": "a number", "bool": "true or false",
              "tuple": "a list of names"}


def _has_type(value, kind):
    """Whether a config.json value has its field's declared type (JSON gives a whole-numbered float as an int)."""
    if kind == "tuple":
        return isinstance(value, tuple) and all(isinstance(v, str) for v in value)
    if kind == "bool" or isinstance(value, bool):
        return kind == "bool" and isinstance(value, bool)
    return isinstance(value, {"str": str, "int": int, "float": (int, float)}[kind])
