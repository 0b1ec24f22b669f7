"""compt: Chain-of-Models Pre-Training (CoM-PT, arXiv 2604.12391) for CLIP model families."""

__version__ = "0.1.0"
