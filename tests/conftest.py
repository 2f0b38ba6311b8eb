"""Test set-up: the CPU split into two logical devices before TensorFlow starts.

Distribution tests run MirroredStrategy over "/cpu:0" and "/cpu:1"; every other test
runs on the default strategy (the first device).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


from corinfomax_tf import distribute  # noqa: E402

CPU_DEVICES = distribute.split_cpu(2)
