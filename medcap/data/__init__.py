"""The data stage: from a dataset as users have it to prepared manifests, and the images in them.

Prepared layout (what every later stage reads)::

    PREP/prepare.json                 options used (root, layout, colour policy, limits) and totals
    PREP/{split}/manifest.csv         one row per kept image (columns: MANIFEST_COLUMNS)
    PREP/{split}/skipped.csv          one row per dropped item: id, image, reason, detail
    PREP/{split}/notes.csv            one row per kept item that needed a remark: id, image, note, detail
    PREP/{split}/stats.json           counts (rows in = kept + skipped), policies, modality, lengths
    PREP/plots/*.png                  written by ``medcap data stats``

Input layouts (detected per split, in this order):

* ROCOv2 release and the ImageCLEFmedical 2024 edition (same files, IDs renamed to
  ``ImageCLEFmedical_Caption_2024_valid_000001``): ``ROOT/{split}/<ID>.jpg`` and
  ``ROOT/{split}_captions.csv``, ``{split}_concepts.csv``, ``{split}_concepts_manual.csv``;
  images may also sit in ``ROOT/{split}_images/`` (the name of the release zips).
* ImageCLEFmedical evaluation layout (2025 edition, IDs like ``ImageCLEFmedical_Caption_2025_valid_0``):
  ``ROOT/{split}/captions.csv``, ``ROOT/{split}/images/<ID>.jpg``, ``ROOT/{split}/concepts.csv``,
  ``ROOT/{split}/concepts_manual.csv``.
* ImageCLEFmedical 2023 edition: ``ROOT/ImageCLEFmedical_Caption_2023_caption_prediction_{split}_labels.csv``
  and ``..._concept_detection_{split}_labels.csv`` (tab separated), images in ``ROOT/{split}/`` or
  a shared ``ROOT/images/``.
* A user's own data: ``--images DIR --captions CSV`` (a folder of images and a CSV of ``ID,Caption``;
  the ID may carry the file extension or not).

Modules: ``rocov2`` (finding the files of each layout), ``tables`` (captions and concepts CSVs),
``inspect`` (checking images cheaply; the colour policies), ``prepare`` (``medcap data prepare``),
``manifest`` (what later stages read), ``stats`` (``medcap data stats``), ``images`` (the one image
reader every stage decodes with), ``download`` (Zenodo), ``phantoms`` (the synthetic dataset).
"""
