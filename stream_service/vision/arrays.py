"""The array type aliases, in one place: dtype in the name, shape in the variable's name (``frame_hw``)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
U8 = npt.NDArray[np.uint8]
U16 = npt.NDArray[np.uint16]
Bool = npt.NDArray[np.bool_]
