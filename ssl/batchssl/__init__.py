"""BatchSSL: MoCo v3 and SimSiam pretraining with BatchFormer on HuggingFace Accelerate."""

__version__ = "0.1.0"
