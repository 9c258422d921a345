"""Imported by the local executor's forkserver: warms it up once, so that each forked run starts warm."""

from lmech.sweeps.worker import warm_up

warm_up()
