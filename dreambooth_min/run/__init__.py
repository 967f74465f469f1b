"""One training run's lifecycle, around the method: the settings and their command line (config, cli), the checks
and loading before the first step (setup, hardware, estimate, data, prior), the loop that calls the method
(training), what a resumed run needs (state, run_folder, optim), surviving failures (faults), torchrun
(distributed) and pivotal tuning's new tokens (pivotal). It may import everything else in the package: the
method and the models at the top, formats/ for files and watch/ for validation, metrics and logs; nothing
imports run/ but the commands (train.py, sample.py, evaluate.py) and the examples.
"""
