"""`python -m export.distill ...` (or `torchrun --nproc_per_node N -m export.distill ...`): the distillation CLI."""
from .demo import run

run()
