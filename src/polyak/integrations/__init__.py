"""Adapters that wire ``polyak.EMA`` into training loops: ``loop`` (any optimizer), ``lightning``
(``polyak[lightning]``) and ``transformers`` (``polyak[hf]``). Import the submodule you need; nothing
heavy is imported here."""
