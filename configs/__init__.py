"""Experiment configs: `python train.py --config configs/<name>.py --workdir runs/<name>`."""
