"""`python -m hf_attn_zoo.tuning {tune,validate} ...` (also under `torchrun -m`)."""

import sys

from .cli import main

sys.exit(main())
