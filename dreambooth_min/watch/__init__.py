"""Watching a training run, beside the method and never part of it: the validation images drawn at epoch
ends (validation), the DreamBooth paper's fidelity metrics (evaluation) with their CLIP and DINO
evaluator models (evaluators) and image preprocessing (preprocess), the paper's evaluation prompts
(eval_prompts), a finished run folder scored for evaluate.py (finished_run), the TensorBoard and wandb
trackers (trackers), and the log files (report), charts (plots) and one-page report.html (page) a run
leaves. Modules here import the top of the package, formats/ and each other, never run/: the training
loop calls into watch/, never the other way.
"""
