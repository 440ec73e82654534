"""The study's experiment in one command: does generated data help segmentation? (`emserve experiment`)

config.py says what runs (arms, baselines, options), generated.py makes the generated data, run.py trains and
scores every seed, report.py turns the scores into intervals and words.
"""

from training.experiment.config import ARMS, ExperimentConfig, baseline_of
from training.experiment.run import run_experiment

__all__ = ["ARMS", "ExperimentConfig", "baseline_of", "run_experiment"]
