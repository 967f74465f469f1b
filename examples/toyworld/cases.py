"""What the experiment compares: the DreamBooth runs (cases) on the pretrained toy model, and the goals.

A case is one `python train.py` run on the toy model: sampled with the same noise as every other model,
measured with the same detectors, shown as one column of the figure and one row of the table. A new case
(another loss, another way to train the tokens...) is one more `Case` in CASES with its extra train.py
arguments, plus, if it makes a claim, one more `Goal`.
"""
from dataclasses import dataclass

INSTANCE_PROMPT, CLASS_PROMPT, RED_PROMPT = "a photo of sks circle", "a photo of a circle", "a photo of a red circle"
PROMPTS = (INSTANCE_PROMPT, CLASS_PROMPT, RED_PROMPT)
METRICS = ("fidelity", "drift", "red_kept")  # headline numbers, one per prompt (see measure.py)
BACKGROUND_METRICS = ("fidelity", "fidelity_pixels", "busy", "busy_class")  # the masked cases' (measure.py)
TRAIN_PROMPT = "a photo of {token} circle"  # train.py fills in {token}: sks, or --pivotal's <s0><s1>


@dataclass(frozen=True)
class Case:
    name: str  # key in results.json and folder runs/<name>
    title: str  # table row
    short: str  # figure column header
    prior: bool  # prior preservation with class images drawn by the frozen model (DreamBooth eq. 2)
    args: tuple = ()  # further train.py arguments
    token: str = "sks"  # the identifier in "a photo of sks circle" when sampled (--pivotal: its new tokens)
    curve: bool = False  # a checkpoint every Settings.curve_every steps, each sampled: steps to 90% (curves.py)
    subject: str = "subject"  # folder of the subject's photos under --out (experiment.save_subject)
    masked: bool = False  # --masks <subject>_masks: the loss sees only the subject (docs/buckets-and-masks.md)

    def prompt(self, prompt):
        """`prompt` as this case's model is asked it: its own identifier instead of sks."""
        return prompt.replace(" sks ", f" {self.token} ")


CASES = (
    Case("no_prior", "DreamBooth LoRA, no prior preservation", "DreamBooth, no prior", prior=False, curve=True),
    Case("prior", "DreamBooth LoRA with prior preservation", "DreamBooth + prior", prior=True, curve=True),
    Case("pivotal", "pivotal tuning (--pivotal) with prior preservation", "pivotal + prior", prior=True,
         args=("--pivotal",), token="<s0><s1>", curve=True),
    Case("pivotal_no_prior", "pivotal tuning (--pivotal), no prior preservation", "pivotal, no prior", prior=False,
         args=("--pivotal",), token="<s0><s1>", curve=True),
    Case("busy", "subject on a busy background, no mask (no prior preservation)", "busy, no mask", prior=False,
         subject="subject_busy"),
    Case("busy_masked", "subject on a busy background, masked loss (no prior preservation)", "busy + mask",
         prior=False, subject="subject_busy", masked=True),
)
# the model before any fine-tuning
PRETRAINED = Case("pretrained", "pretrained (never saw the subject)", "pretrained", prior=False)


def models(names=None):
    """The pretrained model and the cases named in `names` (all when None), in table order."""
    return (PRETRAINED,) + tuple(c for c in CASES if names is None or c.name in names)


def table_models(names=None):
    """(main table, background table): models(names) split by subject; the busy-background cases get their
    own table, under the pretrained model (the floor of their reading). The second is () without them."""
    found = models(names)
    busy = tuple(m for m in found if m.subject != "subject")
    return tuple(m for m in found if m.subject == "subject"), (found[0],) + busy if busy else ()


@dataclass(frozen=True)
class Goal:
    """The paper's claims as targets: `case`'s `metric` is at most (or at least) `value`; with `above_floor`,
    at most `value` above the untouched (pretrained) model's own `metric` on the same seed."""
    label: str
    case: str
    metric: str
    at_most: bool
    value: float
    above_floor: bool = False

    def met(self, results):
        x = results[self.case][self.metric]
        limit = self.value + (results["pretrained"][self.metric] if self.above_floor else 0.0)
        return x <= limit if self.at_most else x >= limit


GOALS = (
    Goal("floor: the pretrained model shows the subject <= 5% for every prompt", "pretrained", "floor", True, 0.05),
    Goal("prior: drift <= floor + 10%", "prior", "drift", True, 0.10, above_floor=True),
    Goal("prior: red kept >= 70%", "prior", "red_kept", False, 0.70),
    Goal("no prior: drift >= 50%", "no_prior", "drift", False, 0.50),
    Goal("no prior: fidelity >= 60%", "no_prior", "fidelity", False, 0.60),
    Goal("prior: fidelity >= 60%", "prior", "fidelity", False, 0.60),
    Goal("no mask: the busy background comes along >= 50%", "busy", "busy", False, 0.50),
    Goal("mask: the busy background comes along <= floor + 10%", "busy_masked", "busy", True, 0.10, above_floor=True),
    Goal("mask: fidelity >= 60%", "busy_masked", "fidelity", False, 0.60),
)


def goals(results):
    """{label: met} for the goals whose case was run."""
    return {g.label: g.met(results) for g in GOALS if g.case in results}
