"""Make the repository importable when a pipeline runs as a script (``python pipelines/x.py``, ``ray job submit``)."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
