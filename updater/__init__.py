"""Berth update agent and provisioner, installed into the image."""
