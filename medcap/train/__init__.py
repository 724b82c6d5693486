"""Training: our own explicit loop on accelerate.

``recipe`` (``fit``: setup, train_step, validate, save, finish), ``batches`` (the data order, a pure
function of seed and epoch), ``loss``, ``optim``, ``state`` (atomic checkpoint folders, RNG, the
position in the data), ``logs``, ``dry_run`` (``medcap train --dry-run``), ``query_cache`` (train from
cached frozen-vision features), ``errors``. Importing this package is cheap (no torch).
"""
