import os

# Spinning OpenMP workers collapse throughput on shared cores (see lrf.bench); set before torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from lrf.view.cli import main  # noqa: E402

raise SystemExit(main())
