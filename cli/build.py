"""`./build.py build` and `./build.py list`: image definitions into images."""

from __future__ import annotations

import argparse
import dataclasses

from builder import formats, image
from builder.config import SNAPSHOT_RE, ImageConfig, OutputFormat, list_images, load_image
from builder.counter import default_version
from builder.log import log, timings
from builder.run import ensure_host_packages
from cli import REPO
from updater.release.version import Version

DEFAULT_IMAGE = "containerhost"
ALL_FORMATS = "all"


def build_config(image_name: str, requested: list[str] | None) -> ImageConfig:
    """The definition, with --format's list (if given) replacing its `formats`: exactly those."""
    config = load_image(image_name, REPO / "images")
    if not requested:
        return config
    chosen = list(OutputFormat) if ALL_FORMATS in requested else requested
    return dataclasses.replace(config, formats=tuple(dict.fromkeys(map(OutputFormat, chosen))))


def build_conflict(args: argparse.Namespace) -> str | None:
    if args.refresh and args.offline:
        return "--refresh bootstraps from the archive and --offline never asks it: give one"
    return None


def snapshot_argument(text: str) -> str:
    if not SNAPSHOT_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a snapshot time like 20261201T000000Z (UTC)"
        )
    return text


def cmd_build(args: argparse.Namespace) -> int:
    config = build_config(args.image, args.formats)
    if args.snapshot is not None:
        config = dataclasses.replace(config, snapshot=args.snapshot)
    tools = (*image.BUILD_TOOLS, *formats.host_tools(config.formats))
    ensure_host_packages(tools, image.BUILD_FILES)
    version: Version = args.version or default_version(REPO / "out")
    log(f"Building image '{config.name}' version {version}")
    result = image.build_image(
        config,
        version,
        REPO,
        refresh=args.refresh,
        offline=args.offline,
        extra_trees=args.extra_tree,
    )
    log("")
    log(f"{'stage':<50} {'seconds':>8}")
    for title, seconds in timings():
        log(f"{title:<50} {seconds:>8.1f}")
    log(f"Built {config.name} {version} in {result.seconds:.1f}s: {result.output}")
    log(f"Boot it: ./build.py run {config.name}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    for name in list_images(REPO / "images"):
        config = load_image(name, REPO / "images")
        print(f"{name:<16} {config.description}")
    return 0
