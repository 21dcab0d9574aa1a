"""rangefs: large objects behind HTTP URLs as local files, through a resumable block cache.

The library mirrors the Go package cloudeng.io/file/largefile; see README.md and
the module docstrings. Imports point one way:
cli -> mount -> ops -> objects -> fetcher/download -> cache, source, ratecontrol, ranges.
"""

__version__ = "0.1.0"
