"""keyreg: robust multi-modal image registration through learned keypoints, in physical space."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # the Python API without importing torch at ``import keyreg`` time
    if name in ("register", "detect_keypoints", "Registration", "AlignmentResult", "Registrar", "RegistrationOptions"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'keyreg' has no attribute {name!r}")
