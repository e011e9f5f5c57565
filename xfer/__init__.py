"""xfer: transfer learning across image domains (core library, no orchestration)."""

__version__ = "0.1.0"
