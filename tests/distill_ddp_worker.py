"""Run under torchrun by test_distill_ddp.py: each JSON argument is one distill() call's keyword arguments."""
import json
import sys

import torch

from export.distill import dist, distill

if __name__ == "__main__":
    torch.set_num_threads(1)
    for kwargs in json.loads(sys.argv[1]):
        distill(**kwargs)
    dist.teardown(dist.current())
