"""keyreg: robust multi-modal image registration through learned keypoints, in physical space."""

__version__ = "0.1.0"
