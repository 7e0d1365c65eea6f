#!/usr/bin/env python
"""Converts a checkpoint with version-1 DCN keys (``conv2_offset.*``) to the current layout.

mmcv's early deformable layers kept their offset conv beside the layer (``layer1.0.conv2_offset``)
instead of inside it (``layer1.0.conv2.conv_offset``). torch 2.x's ``load_state_dict`` no longer
lets the layer rename those keys itself, so convert the file once:

    python tools/convert_mmcv_dcn_checkpoint.py old.pth new.pth

Every ``X_offset.{weight,bias}`` that sits beside a layer weight ``X.weight`` becomes
``X.conv_offset.{weight,bias}``; everything else in the file is kept. Loads with
``weights_only=False``: convert only checkpoints you trust.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import torch

from dcn_plugin.layers.upgrade import upgrade_dcn_state_dict


def convert(src: str, dst: str) -> List[str]:
    """Converts ``src`` into ``dst``; returns the names of the layers upgraded."""
    checkpoint = torch.load(src, map_location="cpu", weights_only=False)
    state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict):
        raise ValueError(f"{src}: no state_dict found (expected a dict or a dict with 'state_dict')")
    upgraded = upgrade_dcn_state_dict(state_dict)
    torch.save(checkpoint, dst)
    return upgraded


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="checkpoint to convert")
    parser.add_argument("dst", help="where to write the converted checkpoint")
    args = parser.parse_args(argv)
    upgraded = convert(args.src, args.dst)
    print(f"upgraded {len(upgraded)} DCN layer(s): {', '.join(upgraded) or '-'}; wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
