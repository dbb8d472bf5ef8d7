"""`python -m edge_runtime.cli ...` is `edge-run ...`."""
import sys

from . import main

sys.exit(main())
