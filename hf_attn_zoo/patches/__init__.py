"""The zoo: one module per method, imported here by name so that each registers itself."""

from . import bam, moh  # noqa: F401
from . import combiner  # noqa: F401
from . import hyper_attention  # noqa: F401
from . import linearize, nalaformer  # noqa: F401
from . import mla  # noqa: F401
from . import moa  # noqa: F401
from . import moba  # noqa: F401
from . import graph_routing, mote  # noqa: F401
from . import power_attention, sliding_window  # noqa: F401
from . import routing_attention  # noqa: F401
