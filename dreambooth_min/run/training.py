"""The training run: set up, then repeat dreambooth_step (dreambooth.py) and an optimizer step on the LoRA.

train() reads top to bottom: check the settings, load the model and photos, draw the class images, add LoRA,
then the loop (latents are encoded as first drawn); Ctrl-C saves a checkpoint from which `resume=True`
continues exactly. run_loop reads as the method's step: assemble a batch, `micro_step` (the loss and its
backward pass), and every --grad-accum micro-batches the sync (torchrun), the optimizer step
(state.py: unscale, clip, AdamW, LR schedule), `log_step` (log.jsonl, tracker, progress bar), a checkpoint
when due; validation at the end of an epoch.
"""
import math
import time

import torch
from tqdm.auto import tqdm

from ..conditioning import Cond
from ..dreambooth import assemble_batch, dreambooth_step
from ..errors import UserError
from ..formats.lora_file import save_lora
from ..formats.lora_names import kohya_unet_paths
from ..lora import TEXT_TARGETS, inject_lora
from ..watch.validation import Monitor, report_step, validate
from . import distributed as dist
from . import pivotal
from .buckets import bucket_sizes, epoch_batch
from .data import epoch_order
from .faults import guarded
from .hardware import compile_unet
from .setup import prepare
from .state import TrainingState, save_checkpoint


def validate_and_report(cfg, setup, epoch, step=0):
    validate(cfg, setup, epoch, step)
    setup.run.write_report()  # report.html shows the new row (and metrics)


validate_on_main = dist.main_only(validate_and_report)  # rank 0 draws and writes the samples; the others wait


class Interrupted(Exception):
    """Raised by `stop_after` (tests) to take the same path as Ctrl-C."""


class Diverged(UserError):
    """Training produced only non-finite losses: the run stops with a checkpoint of its (finite) LoRA."""


MAX_NONFINITE_STEPS = 5  # skipped steps in a row before the run gives up


def train(cfg, resume=False, stop_after=None, log=tqdm.write):
    """Train a DreamBooth LoRA; returns {"output", "lora", "step", "interrupted"}.

    `resume` continues the run in cfg.output from its latest checkpoint. Ctrl-C (KeyboardInterrupt) saves
    a checkpoint at the last finished step and returns with interrupted=True.
    """
    setup = prepare(cfg, resume, log)
    log = dist.main_log(log)  # under torchrun rank 0 speaks for all
    unet_loras, text_loras, text_loras_2 = add_lora(cfg, setup.sd)
    micro_per_epoch, total_steps = dist.schedule_length(cfg, len(setup.instance_latents),  # global batches
                                                        bucket_sizes(setup.buckets))
    embeddings = pivotal.start(cfg, setup.sd, setup.captions, log) if cfg.pivotal else None  # --pivotal's tokens
    state = TrainingState(cfg, unet_loras, text_loras, setup.hardware.grad_scaler(), total_steps, text_loras_2,
                          kohya_unet_paths(setup.sd.unet), embeddings)
    setup.lora_tensors = state.lora_tensors
    if resume:
        checkpoint = setup.run.resume(state, log)  # the newest whole one; damaged ones are named and passed over
        log(f"resumed from {checkpoint or 'the start'} (step {state.step} of {total_steps})")
        if dist.is_main():
            setup.run.drop_after(state.step, state.step * cfg.grad_accum // micro_per_epoch)
    setup.monitor = Monitor(cfg, setup, state.step + 1 if resume else None) if dist.is_main() else None
    if not resume and (cfg.validate_every or cfg.eval_every):
        validate_on_main(cfg, setup, epoch=0)
    with guarded(cfg, setup, state, total_steps):  # out of memory, a full disk: one line and a checkpoint
        interrupted = run_loop(cfg, setup, state, total_steps, micro_per_epoch, stop_after)
        result = finish(cfg, setup, state, total_steps, interrupted, log)
        if dist.is_main():
            setup.run.write_report(result, dist.command())  # report.html: the run on one page
        return result


def finish(cfg, setup, state, total_steps, interrupted, log):
    """loss.png, then the LoRA (or, when interrupted, a checkpoint to resume from), and what to do next."""
    if dist.is_main():  # rank 0 alone writes the run folder
        setup.run.plot_loss()
    if interrupted:
        checkpoint = save_checkpoint(cfg, setup, state)
        log(f"interrupted at step {state.step}/{total_steps}: checkpoint saved in {checkpoint}; "
            f"continue with: {dist.command()} --resume {setup.run.path}")
        return {"output": setup.run.path, "lora": checkpoint and checkpoint / "lora.safetensors", "step": state.step,
                "interrupted": True}
    embedding = pivotal.embedding_path(setup.run.path) if state.embeddings else None
    if dist.is_main():
        metadata = setup.lora_metadata(cfg, state.step)
        if state.ema:  # the last step's factors beside the average; lora.safetensors last: it marks the run done
            save_lora(setup.run.path / "lora_raw.safetensors", state.lora_tensors(), metadata)
        with state.averaged():
            save_lora(setup.run.lora_path, state.lora_tensors(), metadata)
        if embedding:  # apart from the LoRA: token keys inside a LoRA file break some loaders
            pivotal.save(embedding, state.embeddings, cfg, setup.sd, state.step)
    samples = f"samples in {setup.run.samples}; " if cfg.validate_every or cfg.eval_every else ""
    log(f"done: {state.step} step{'s' * (state.step != 1)}; LoRA in {setup.run.lora_path}; "
        f"{f'embedding in {embedding}; ' if embedding else ''}{samples}the run on one page: "
        f"{setup.run.path / 'report.html'}; try: python sample.py --model {cfg.model} --lora {setup.run.lora_path} "
        f"{f'--embedding {embedding} ' if embedding else ''}"
        f"--prompt \"{setup.prompt} on the beach\" --height {setup.resolution} --width {setup.resolution}")
    return {"output": setup.run.path, "lora": setup.run.lora_path, "step": state.step, "interrupted": False}


def run_loop(cfg, setup, state, total_steps, micro_per_epoch, stop_after=None):
    """Micro-batches until `total_steps` optimizer steps; returns True when interrupted (Ctrl-C).

    Under torchrun every process draws the same global batch and keeps its rows (distributed.py)."""
    n = len(setup.instance_latents)
    bs = min(cfg.batch_size * dist.world_size(), n)  # the global batch
    contexts = TextContexts(setup.sd, trainable=bool(state.text_loras or state.text_loras_2 or state.embeddings))
    bar = tqdm(total=total_steps, initial=state.step, desc="training", unit="step", disable=not dist.is_main())
    start, boundary, running, stop, first = time.time(), state.generator.get_state(), None, False, state.step
    dist.stop_on_signal()
    try:
        for micro in range(state.step * cfg.grad_accum, total_steps * cfg.grad_accum):
            epoch, pos = divmod(micro, micro_per_epoch)
            index = epoch_batch(epoch_order(n, cfg.seed, epoch), pos, bs, setup.buckets)  # one bucket's photos
            batch, share = dist.local_batch(assemble_batch(
                setup.instance_latents, setup.captions, index, setup.class_latents_for(index), setup.class_prompt,
                state.generator, cfg.offset_noise))
            parts = micro_step(cfg, setup, state, batch, contexts, share)
            running = parts if running is None else running + parts  # the mean over the micro-batches
            if (micro + 1) % cfg.grad_accum == 0:
                running, stop = dist.sync_step(state.params, running)  # torchrun: the mean over the processes
                lr = state.optimizer.param_groups[0]["lr"]  # the rate this step uses
                losses, grad_norm = state.optimizer_step(cfg.max_grad_norm, running)  # the step's one host sync
                log_step(setup, state, losses, lr, grad_norm, (micro + 1) / micro_per_epoch, time.time() - start, bar)
                if cfg.compile and state.step == first + 1 and dist.is_main():  # the first step compiles
                    bar.write(f"compile: the first step took {time.time() - start:.1f} s, compiling included")
                boundary, running = state.generator.get_state(), None
                if cfg.save_every and state.step % cfg.save_every == 0 and state.step < total_steps:
                    save_checkpoint(cfg, setup, state)
            epochs_done = (micro + 1) // micro_per_epoch
            if (micro + 1) % micro_per_epoch == 0 and cfg.is_validation_epoch(epochs_done):
                with state.averaged():  # --ema-decay: validation draws with the average
                    validate_on_main(cfg, setup, epochs_done, state.step)
            if stop or (stop_after is not None and state.step >= stop_after):
                raise Interrupted
    except Diverged:
        save_checkpoint(cfg, setup, state)  # finite factors: the non-finite steps were skipped
        raise
    except (KeyboardInterrupt, Interrupted):
        state.generator.set_state(boundary)  # the state at the last finished step, which is what we save
        state.optimizer.zero_grad(set_to_none=True)
        return True
    finally:
        bar.close()
    return False


def micro_step(cfg, setup, state, batch, contexts, share):
    """The DreamBooth loss of one micro-batch and its backward pass (the LoRA's gradients accumulate).

    Returns the loss parts [loss, instance, prior] as this micro-batch's part of the optimizer step's mean:
    times `share` (this process's share of the global batch, 1 without torchrun), over --grad-accum.
    """
    sd = setup.sd
    if not batch.n_instance:  # under torchrun, a short last batch of an epoch can leave a process no rows
        return torch.zeros(3, device=setup.hardware.device)
    sd.unet.train()
    with setup.hardware.autocast():
        parts = dreambooth_step(sd.unet, batch, contexts(batch.prompts, batch.time_ids), sd.prediction_type,
                                cfg.prior_weight if cfg.use_prior else 0.0, cfg.snr_gamma)
    state.scaler.scale(parts[0] * share / cfg.grad_accum).backward()  # GradScaler: no fp16 gradient underflows
    return torch.stack(parts).detach() * share / cfg.grad_accum


def log_step(setup, state, losses, lr, grad_norm, epoch, seconds, bar):
    """A finished optimizer step's line in log.jsonl, the tracker and the progress bar (rank 0's, under torchrun):
    its `losses` [loss, instance, prior], the `lr` it used and the `grad_norm` it clipped. Raises Diverged
    after MAX_NONFINITE_STEPS skipped steps in a row."""
    loss, loss_instance, loss_prior = losses
    finite = math.isfinite(loss)
    record = {"step": state.step, "epoch": round(epoch, 4), "loss": loss, "loss_instance": loss_instance,
              "loss_prior": loss_prior, "lr": lr, "grad_norm": grad_norm, "seconds": round(seconds, 3)}
    if "d" in state.optimizer.param_groups[0]:  # Prodigy: its estimated step size; the step moves by about d * lr
        record["prodigy_d"] = float(state.optimizer.param_groups[0]["d"])
    state.nonfinite_in_a_row = 0 if finite else state.nonfinite_in_a_row + 1
    if not finite:
        record["skipped"] = "non-finite loss"
    if dist.is_main():
        setup.run.append_log(record)
    if state.nonfinite_in_a_row >= MAX_NONFINITE_STEPS:
        raise Diverged(f"the loss was not finite for {MAX_NONFINITE_STEPS} steps in a row (up to step {state.step}); "
                       "those steps were skipped and the LoRA is unharmed. Try a lower --lr, --precision fp32 or bf16, "
                       "or --prediction-type if the model's was detected wrongly")
    if dist.is_main():
        report_step(setup, record)
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
    bar.update(1)
    return record


class TextContexts:
    """The conditioning c of each row: its caption's text encoding (SDXL: a conditioning.Cond of both encoders'
    states and the pooled text) with the row's size time ids. A frozen text encoder gives the same encoding
    every step, so it is cached (per caption)."""

    def __init__(self, sd, trainable):
        self.sd, self.trainable, self.cache = sd, trainable, {}

    def __call__(self, prompts, time_ids=None):
        if self.trainable:
            cond = self.sd.encode_prompt(prompts)
        else:
            for p in set(prompts) - self.cache.keys():
                with torch.no_grad():
                    self.cache[p] = self.sd.encode_prompt([p])
            cond = Cond.cat([self.cache[p] for p in prompts])
        return cond if time_ids is None else cond.with_time_ids(time_ids)


def add_lora(cfg, sd):
    """LoRA (--dora: DoRA) wrappers on the UNet's `lora_targets` and, with --train-text-encoder, on the text
    encoders' attention (SDXL: both): ({path: wrapper} of the UNet, of the text encoder, of SDXL's second one
    or None)."""
    torch.manual_seed(cfg.seed)  # LoRA's down factors are drawn from the global generator
    unet_loras = inject_lora(sd.unet, cfg.lora_targets, cfg.rank, cfg.alpha or None,
                             conv_rank=cfg.conv_rank or None, conv_alpha=cfg.conv_alpha or None, dora=cfg.dora or None)
    text = lambda encoder: inject_lora(encoder, TEXT_TARGETS, cfg.rank, cfg.alpha or None, dora=cfg.dora or None) \
        if cfg.train_text_encoder else {}
    second = getattr(sd, "text_encoder_2", None)
    sd.unet.gradient_checkpointing = cfg.gradient_checkpointing
    sd.unet.low_memory = cfg.low_memory
    if cfg.compile:
        compile_unet(sd.unet)
    return unet_loras, text(sd.text_encoder), None if second is None else text(second)
