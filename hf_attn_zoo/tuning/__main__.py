"""`python -m hf_attn_zoo.tuning {tune,validate} ...` (also under `torchrun -m`)."""

import os
import sys

from .cli import main
from .distributed import world_size

code = main()
if world_size() > 1:
    # one of several processes: everything is written and the process group closed; leave without the interpreter's
    # teardown, where gloo's threads abort a finished run now and then ("terminate called without an active exception")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
