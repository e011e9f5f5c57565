"""The `xfer` console command: argument parsing over the flows, the core and the registry.

Dependency direction: cli -> flows -> tasks -> xfer; nothing below imports cli.
"""
