"""Built-in passes. Importing this package registers them all with `optforge.pass_`."""

from optforge.passes import quant  # noqa: F401
