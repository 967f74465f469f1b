"""--ema-decay: an exponential moving average of the trained tensors (LoRA factors, DoRA magnitudes).

After each optimizer step t (counted from 0), shadow <- d_t shadow + (1 - d_t) param with
d_t = min(decay, (1 + t) / (10 + t)): diffusers' EMAModel warm-up, so that the first steps, taken from
the untrained start (B = 0), do not dominate an average with a long memory. Validation and the final
lora.safetensors use the average (`applied`); the last step's tensors are kept in lora_raw.safetensors.
Plumbing of the run, not the method: the trained tensors themselves never see the average.
"""
from contextlib import contextmanager

import torch


class EMA:
    def __init__(self, params, decay):
        self.params, self.decay, self.updates = list(params), float(decay), 0
        self.shadow = [p.detach().clone() for p in self.params]

    def current_decay(self):
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self):
        """shadow += (1 - d_t) (param - shadow), after an optimizer step."""
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - self.current_decay())
        self.updates += 1

    @contextmanager
    def applied(self):
        """The parameters hold the average inside the block, their own values again after it."""
        for p, s in zip(self.params, self.shadow):
            p.data, s.data = s.data, p.data
        try:
            yield
        finally:
            for p, s in zip(self.params, self.shadow):
                p.data, s.data = s.data, p.data

    def state_dict(self):
        return {"decay": self.decay, "updates": self.updates, "shadow": [s.cpu() for s in self.shadow]}

    @torch.no_grad()
    def load_state_dict(self, state):
        self.decay, self.updates = state["decay"], state["updates"]
        for s, saved in zip(self.shadow, state["shadow"], strict=True):
            s.copy_(saved)


@contextmanager
def averaged(ema):
    """ema.applied(), or nothing without --ema-decay."""
    if ema is None:
        yield
    else:
        with ema.applied():
            yield
