"""stream-service: real-time visual inspection over ZeroMQ.

Frames flow camera -> capture -> soartc -> infer -> subscribers; see README.md for the diagram.
Importing the package is cheap: heavy or device-specific modules (onnxruntime, cupy, torch) are
imported inside the functions that need them.
"""

from __future__ import annotations

__version__ = "0.1.0"
