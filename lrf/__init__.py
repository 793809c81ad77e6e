"""lrf: latent radiance fields with 3D-aware 2D representations, all three stages."""
import os as _os

# Busy-waiting OpenMP threads collapse throughput when two jobs share two cores (measured:
# 5.3 -> 1.2 it/s in lrf.bench); passive waiting costs nothing when the machine is idle.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
