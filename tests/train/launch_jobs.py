"""Run several `editrt` commands in one process, one after the other: what tests/train/test_processes.py starts
under `accelerate launch` so that one pair of processes (one torch import, one gloo group) serves every job.

    python launch_jobs.py JOBS.json     (JOBS.json: a list of argument lists for editrt.cli.main)
"""
import json
import sys

import torch

from editrt.cli import main

if __name__ == "__main__":
    torch.set_num_threads(1)
    for args in json.loads(open(sys.argv[1]).read()):
        rc = main(args)
        if rc:
            sys.exit(rc)
