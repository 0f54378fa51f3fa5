"""patchaudit scheduler: run planning, the Redis Streams protocol, the CLI.

Must stay light: `patchaudit --help` imports this package and must not import torch.
"""
