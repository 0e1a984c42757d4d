"""``python train.py fit --config configs/demo.yaml`` quantizes a model; ``python train.py evaluate`` /
``generate`` score or run it, or the FP model (hh_lightning/cli.py; installed as ``hh-lightning``)."""

from hh_lightning.cli import entry

if __name__ == "__main__":
    entry()
