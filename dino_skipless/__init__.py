"""skipless-dino: DINO pretraining and dense evaluation of residual-free Vision Transformers.

Reproduction toolkit for "Cutting the Skip: Training Residual-Free Transformers"
(Ji et al., arXiv 2510.00345).
"""

__version__ = "0.1.0"
