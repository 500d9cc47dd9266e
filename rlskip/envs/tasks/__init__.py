"""Benchmark tasks, registered by name: ``get_task("xsum")``, ``get_task("glue", config="rte")``.

Importing this package imports every task module so that each registers itself.
"""

from . import cnn_dailymail, glue, squad, synthetic, xsum  # noqa: F401  (imported to register the tasks)
from .base import TASKS, Example, Task, get_task

__all__ = ["TASKS", "Example", "Task", "get_task"]
