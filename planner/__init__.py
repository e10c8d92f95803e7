"""offplan planner: model and hardware descriptions, cost model, ILP, baselines.

Pure Python (numpy / scipy / pulp). This package never imports torch.
"""

__version__ = "0.1.0"
