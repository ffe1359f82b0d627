"""Tensor parallelism: what a rank holds (`shard.py`), the other ranks' processes (`ranks.py`), rank 0's core
(`leader.py`) and semi-PD under TP (`semipd.py`)."""
