"""Data preparation tools for cnclip.

`data_tools build-pairs` turns query-based crawl dumps into clean Chinese image-text pairs
(Chinese-CLIP TSV+JSONL layout, pairs JSONL or webdataset shards) and a report that accounts
for every input record. See `data_tools.pipeline` for the stage order.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
