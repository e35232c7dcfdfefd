"""Block-wise quantization of a whole model: calibration, Hessians, rounding, propagation, resume."""
