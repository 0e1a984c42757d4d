"""hh_lightning: W4A4 quantization with learned Householder rotations and HQQ."""

__version__ = "0.1.0"
