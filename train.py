"""Quantize a model: ``python train.py fit --config configs/demo.yaml`` (see hh_lightning/cli.py)."""

from hh_lightning.cli import main

if __name__ == "__main__":
    main()
