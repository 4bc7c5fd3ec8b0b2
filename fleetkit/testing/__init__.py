"""Helpers for testing fleetkit and its plugins."""
