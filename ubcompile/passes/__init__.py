"""Graph matching and rewriting: the FX side of ubcompile."""

from .joint_pass import JointSamplingPass

__all__ = ["JointSamplingPass"]
