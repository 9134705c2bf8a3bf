"""The machine's disk: the GPT, the A/B root slots, dm-verity trees and the systemd-boot entries on
the ESP.

May import `release` and the shared modules (`errors`, `files`, `run`); never the agent, the
daemon or the network. The builder uses `gpt` to write images, so these modules stay free of
device-only assumptions (they work on image files as on block devices).
"""
