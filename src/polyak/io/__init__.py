"""Checkpoints: ``save``/``load`` (safetensors or torch weights_only, atomic writes, verified reads)
and peer formats (``from_peer``, ``export``)."""

from polyak.io._checkpoint import Checkpoint, load, read, save
from polyak.io._exchange import export, from_peer
from polyak.io.peers import PEER_FORMATS, detect

__all__ = ["PEER_FORMATS", "Checkpoint", "detect", "export", "from_peer", "load", "read", "save"]
