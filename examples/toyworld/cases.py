"""What the experiment compares: the DreamBooth runs (cases) on the pretrained toy model, and the goals.

A case is one `python train.py` run on the toy model: sampled with the same noise as every other model,
measured with the same detectors, shown as one column of the figure and one row of the table. A new case
(a masked loss, pivotal tuning...) is one more `Case` in CASES with its extra train.py arguments, plus, if
it makes a claim, one more `Goal`.
"""
from dataclasses import dataclass

INSTANCE_PROMPT, CLASS_PROMPT, RED_PROMPT = "a photo of sks circle", "a photo of a circle", "a photo of a red circle"
PROMPTS = (INSTANCE_PROMPT, CLASS_PROMPT, RED_PROMPT)
METRICS = ("fidelity", "drift", "red_kept")  # headline numbers, one per prompt (see measure.py)


@dataclass(frozen=True)
class Case:
    name: str  # key in results.json and folder runs/<name>
    title: str  # table row
    short: str  # figure column header
    prior: bool  # prior preservation with class images drawn by the frozen model (DreamBooth eq. 2)
    args: tuple = ()  # further train.py arguments


CASES = (
    Case("no_prior", "DreamBooth LoRA, no prior preservation", "DreamBooth, no prior", prior=False),
    Case("prior", "DreamBooth LoRA with prior preservation", "DreamBooth + prior", prior=True),
)
PRETRAINED = Case("pretrained", "pretrained", "pretrained", prior=False)  # the model before any fine-tuning


def models(names=None):
    """The pretrained model and the cases named in `names` (all when None), in table order."""
    return (PRETRAINED,) + tuple(c for c in CASES if names is None or c.name in names)


@dataclass(frozen=True)
class Goal:
    """The paper's claims as targets: `case`'s `metric` is at most (or at least) `value`."""
    label: str
    case: str
    metric: str
    at_most: bool
    value: float

    def met(self, results):
        x = results[self.case][self.metric]
        return x <= self.value if self.at_most else x >= self.value


GOALS = (
    Goal("prior: drift <= 10%", "prior", "drift", True, 0.10),
    Goal("prior: red kept >= 70%", "prior", "red_kept", False, 0.70),
    Goal("no prior: drift >= 50%", "no_prior", "drift", False, 0.50),
    Goal("no prior: fidelity >= 60%", "no_prior", "fidelity", False, 0.60),
    Goal("prior: fidelity >= 60%", "prior", "fidelity", False, 0.60),
)


def goals(results):
    """{label: met} for the goals whose case was run."""
    return {g.label: g.met(results) for g in GOALS if g.case in results}
