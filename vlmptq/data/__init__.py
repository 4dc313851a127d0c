"""Package data: the built-in calibration photos and the script that regenerates them."""
