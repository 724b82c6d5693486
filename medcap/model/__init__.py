"""Models: the family layer and everything that is the same for every family.

* ``family``: the ``ModelFamily`` protocol; ``families/``: one package per family and the table of
  them (``families/__init__.py``: ``resolve_family``, ``get_family``);
* ``build``: ``build_model(cfg) -> (model, processor)``;
* ``adapters``: PEFT on the family's target presets, ``model.train_*`` flags, parameter counts;
* ``peft_methods`` (every PEFT method's peft config and init), ``peft_inits`` (EVA / CorDA statistics
  from training batches), ``peft_state`` (what a method needs saved and from the training loop);
* ``collate``: the training collator of families whose processor inserts the image tokens;
* ``checkpoint``: ``save_trainable`` / ``load_trainable`` / ``load_checkpoint``;
* ``random_init``, ``quantize``, ``tokenizer`` (the offline tokenizer), ``cpu`` (fp32 compute of
  frozen half layers on CPUs without native half products), ``cuda`` (attention and allocator).

Importing this package is cheap: torch loads with the submodules that need it.
"""
