"""Built-in passes. Importing this package registers them all with `optforge.pass_`."""

from optforge.passes import quant  # noqa: F401
from optforge.passes import export  # noqa: F401
from optforge.passes import fuse  # noqa: F401
from optforge.passes import prune  # noqa: F401
from optforge.passes import distill  # noqa: F401
from optforge.passes import pack  # noqa: F401
