"""Ray Serve reads its settings when first imported: owq's (`server/ray_env.py`) are set before
any test module imports it."""

import importlib.util

if importlib.util.find_spec("ray") is not None:
    from owq.server import ray_env

    ray_env.configure(local=True)
