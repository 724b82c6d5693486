"""The phantom dataset: synthetic radiology-like images and captions in the ROCOv2 release layout.

``medcap data phantoms --out DIR --n N --seed S`` (or :func:`make_phantoms`) draws CT-, MR-, X-ray-,
ultrasound- and angiography-like images procedurally (numpy + Pillow) and writes, exactly as the
ROCOv2 release does::

    DIR/{train,valid,test}/ROCOv2_2023_{split}_NNNNNN.jpg
    DIR/{split}_captions.csv            ID,Caption
    DIR/{split}_concepts.csv            ID,CUIs        (modality, region, finding, side, organ)
    DIR/{split}_concepts_manual.csv     ID,CUIs        (modality, region)
    DIR/cui_mapping.csv                 CUI,Canonical name

plus two extra files that the release does not have (readers of the layout ignore them):
``DIR/{split}_phantom_facts.csv`` (the drawing parameters of every image, the ground truth that
:func:`phantom_facts` reads) and ``DIR/phantoms.json`` (options and counts).

Every caption is composed from the parameters that drew its image, and every fact it states is
visible in the image, large enough to survive a resize to 64 px:

* modality, by overall appearance: CT = round body section, white bone, dark fat, black air,
  a scanner table below; MR (T2-weighted) = bright fat and fluid, black bone cortex and air, coil
  shading; X-ray = frontal projection, bright bones on a dark background; ultrasound = a fan-shaped
  sector of speckle on black; angiography = a dark vessel tree on a bright background.
* plane: CT/MR heads and abdomens are axial or coronal (a coronal head shows the neck below the
  skull; a coronal abdomen the lung bases, a column of vertebrae and upright kidneys); other CT/MR
  sections are axial, X-ray and angiography frontal, ultrasound transverse.
* region (head, chest, abdomen, knee, neck), by body outline and anatomy.
* side, by which half of the image holds the lesion. Radiological convention throughout: the
  patient's RIGHT is on the IMAGE LEFT (axial CT/MR seen from the feet, frontal X-ray and
  angiography seen from the front, transverse ultrasound likewise). Nothing is ever mirrored.
* finding: mass (bright, lobulated, heterogeneous), cyst (round, homogeneous, sharp: dark on CT and
  ultrasound, bright on T2 MR), fracture (displaced bone fragment with soft-tissue swelling),
  aneurysm (round sac on a vessel), occlusion (a vessel that stops; the other side is complete).
* size: two classes per (modality, region), stated in cm or mm; the lesion is drawn to that size
  relative to the body (or the ultrasound field of view).

Held-out combinations (:data:`HELD_OUT_RULES`): never in train; images 1, 5, 9, ... of valid and
test are drawn from them in turn, the other valid/test images from the training distribution.

* ultrasound + mass (train has ultrasound cysts and masses of other modalities);
* head + cyst + patient's left (CT, MR);
* knee + fracture + patient's right (X-ray);
* abdomen + mass + patient's left (CT, MR, ultrasound).

Each single value of each fact still appears in train. The ``held_out`` column of
``{split}_phantom_facts.csv`` marks these images, so a caller can score seen and new combinations
apart: the new ones need compositional generalisation. Measured with a 4-layer CNN trained from
scratch on the 1,050 train images of ``--n 1500`` at 64 px (25 epochs, CPU): on the seen
combinations of valid+test (336 images) modality 1.00, region 0.99, finding 0.93, side 0.94, size
0.91 (majority guess 0.26, 0.26, 0.51, 0.50, 0.36); on the held-out ones modality 0.98, region
0.95, but finding 0.13 and side 0.46: a small model learns the combinations, not the rule.

Images are stored with one channel (L), as grey RGB (some with coloured annotation arrows: grey
pictures with colour marks), or in true colour (colour Doppler on ultrasound), in ROCOv2-like sizes
(500-1000 px a side by default).
Everything is deterministic for a seed: the same options give the same bytes.

Modules: ``design`` (facts, captions, scoring), ``draw`` (the pictures), ``make`` (writing a dataset).
"""

from medcap.data.phantoms.design import (
    SCORED_FACTS,
    PhantomOptionError,
    caption_facts,
    compose_caption,
    fact_accuracy,
    is_held_out,
    phantom_facts,
)
from medcap.data.phantoms.make import make_phantoms, plan_phantoms

__all__ = [
    "SCORED_FACTS",
    "PhantomOptionError",
    "caption_facts",
    "compose_caption",
    "fact_accuracy",
    "is_held_out",
    "make_phantoms",
    "phantom_facts",
    "plan_phantoms",
]
