"""The Ray clusters these tests start in-process listen on loopback only: Ray reads this variable when it is first
imported (runtime/server/cli.py LOCAL_RAY_ENV says why it is the one that works), and a conftest is imported before
the test modules of its folder import ray."""
import os

from editrt.runtime.server.cli import LOCAL_RAY_ENV

for _name, _value in LOCAL_RAY_ENV.items():
    os.environ.setdefault(_name, _value)
