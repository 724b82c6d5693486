"""Inference: captions out of a trained model.

``generate`` (``caption_images``, ``load_captioner``), ``caption`` (``caption_files``: files and
folders), ``predict`` (a prepared split to an ImageCLEFmedical submission), ``export`` and
``model_card`` (merged or base + adapter folders with a Hugging Face card), ``serve/`` (the HTTP
service and web page). Importing this package is cheap (no torch).
"""
