"""Concepts (UMLS CUIs) as a task of their own and as a lever for captions.

* ``vocab``: the concept vocabulary built from the training split (``min_freq``), and the audit of
  bad CUIs in training data (malformed, duplicated, out of the vocabulary: counted, never fatal);
* ``features``: the frozen vision side's output (BLIP-2: the query embeddings) from the query cache of
  ``medcap features`` or from the vision tower;
* ``head``: the classifier (linear or small MLP) and its class-balanced loss; ``thresholds``: tuned on
  validation for the official per-image F1;
* ``train`` (``medcap concepts train``), ``model`` (a trained concept model, a predictor of images'
  concepts), ``predict`` (``medcap concepts predict``: the ImageCLEFmedical concept-detection submission);
* ``prompts``: the modality or concepts of an image as words in the caption prompt
  (``data.prompt_with``); ``guide``: what they add to a caption run (per-example prompts from the
  ground truth, the auxiliary concept head of ``train.concept_loss_weight``) and to captioning
  (prompts from a concept model).

Scoring is ``medcap.eval.concepts`` (exactly the 2025 evaluator's rules).
"""
