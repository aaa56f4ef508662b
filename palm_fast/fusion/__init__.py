"""palm_fast.fusion: a small graph-kernel fusion engine (after MindSpore's, used for PanGu-alpha).

Composite ops are expanded into primitive-op graphs (:mod:`.expanders`), simplified and
partitioned into kernels by explicit rules (:mod:`.passes`, modes ``mindspore`` and ``full``),
and each kernel's Triton source is generated, cached and launched (:mod:`.codegen`).
:mod:`.layer_norm` holds the LayerNorm launchers built on it.
"""
from . import expanders
from .codegen import CompiledGraph, compile_graph, explain
from .ir import Graph, Node, NodeId
from .passes import MODES, FusionError, Partition, Schedule, cse, dce, fuse, prepare, simplify

__all__ = ["MODES", "CompiledGraph", "FusionError", "Graph", "Node", "NodeId", "Partition", "Schedule",
           "compile_graph", "cse", "dce", "expanders", "explain", "fuse", "prepare", "simplify"]
