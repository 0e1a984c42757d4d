"""``python train.py fit --config configs/demo.yaml`` quantizes a model (hh_lightning/cli.py);
``python train.py evaluate`` / ``generate`` score or run it, or the FP model (hh_lightning/commands.py)."""

from hh_lightning.commands import main

if __name__ == "__main__":
    main()
