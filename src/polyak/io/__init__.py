"""Checkpoints: ``save``/``load`` (safetensors or torch weights_only, atomic writes, verified reads)
and peer formats (``from_peer``, ``export``)."""

from polyak.io._checkpoint import Checkpoint, load, read, save
from polyak.io.peers import PEER_FORMATS, detect, export, from_peer

__all__ = ["PEER_FORMATS", "Checkpoint", "detect", "export", "from_peer", "load", "read", "save"]
