"""fleetkit: a cluster init system that schedules systemd units across machines."""

__version__ = "0.1.0"
