"""Benchmark-exact caption metrics (ImageCLEFmedical caption prediction, COCO captioning).

``score_captions(predictions, references, cfg)`` returns one score per caption pair for every
requested metric. What "exact" means here, metric by metric (see ``docs/FACTS.md`` section 2):

* **Preprocessing** (``preprocess``): lowercase, every run of digits -> ``number``, every
  character of ``string.punctuation`` deleted, in that order; no stemming, no stopwords. Used
  before BERTScore, ROUGE, BLEURT and (in the ImageCLEF protocols) BLEU / METEOR / CIDEr.
* **BERTScore F1**: the official evaluators call ``bert_score`` once per caption pair. Scoring all
  pairs in one call is faster but *not* equal: bert-score's batched greedy matching multiplies
  padded similarities by zero before the max, so a token whose real similarities are all negative
  gets 0 instead of its best match (up to 6e-3 per pair on short captions). ``BertScoreExact``
  computes the token embeddings in length-sorted batches (the expensive part) and then runs
  bert-score's own ``greedy_cos_idf`` on each pair unpadded, which reproduces the
  one-pair-at-a-time numbers within 1e-6 (tested) while being many times faster.
* **ROUGE-1 F**: ``rouge_score`` with no stemmer, one pair at a time.
* **BLEU-1..4, METEOR, CIDEr-D, ROUGE-L** (``pycocoevalcap``): per-caption values are the
  library's per-image scores. For METEOR, CIDEr and ROUGE-L the corpus value the library reports
  is the mean of those. BLEU is different by nature: the corpus BLEU pools n-gram counts over all
  captions, so it is reported separately (``CaptionScores.corpus``) next to the mean of the
  sentence BLEUs. METEOR, and PTB tokenisation in the COCO protocol, need Java.
* **CLIPScore / RefCLIPScore** (Hessel et al. 2021): ``2.5 * max(cos(image, caption), 0)``;
  RefCLIPScore is the harmonic mean of CLIPScore and ``max(cos(caption, reference), 0)``. The
  ImageCLEFmedical 2025 "image-caption similarity" is the same formula with a medical model
  (MedImageInsight); give a CLIP-type model with ``clip_model``.
* **BLEURT**: a checkpoint folder (``lucadiliello/BLEURT-20-D12`` through the ``bleurt_pytorch``
  package when installed, or any BLEURT converted to a ``transformers`` sequence-classification
  model), on preprocessed captions.

A pair where both captions are empty scores 1 for every metric. A metric that cannot run (its
model is not there, Java is missing, no images were given) is left out of the result and named in
``CaptionScores.unavailable`` with the reason; the other metrics are still computed."""

from __future__ import annotations

import math
import re
import shutil
import string
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tqdm.auto import tqdm

from medcap.eval.bertscore import BertScoreExact

_DIGITS = re.compile(r"\d+")

_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)

#: Every metric name ``score_captions`` knows, in the order they appear in tables.
ALL_METRICS = (
    "bertscore",
    "rouge1",
    "bleu1",
    "bleu2",
    "bleu3",
    "bleu4",
    "meteor",
    "rougeL",
    "cider",
    "bleurt",
    "clipscore",
    "refclipscore",
)

#: Metric groups that are requested by one name and produce several columns.
_GROUPS = {"bleu": ("bleu1", "bleu2", "bleu3", "bleu4")}


def preprocess(text: str) -> str:
    """ImageCLEFmedical caption preprocessing: lowercase, digit runs -> "number", drop punctuation.

    The order matters and is the official one: ``"COVID-19"`` -> ``"covid-19"`` ->
    ``"covid-number"`` -> ``"covidnumber"``. Only ASCII punctuation (``string.punctuation``) is
    deleted; Unicode punctuation and whitespace are kept, as the official evaluator does.
    """
    text = text.lower()
    text = _DIGITS.sub("number", text)
    return text.translate(_NO_PUNCTUATION)


@dataclass
class MetricsConfig:
    """Which metrics to compute and with which models."""

    metrics: list[str] = field(default_factory=lambda: ["bertscore", "rouge1", "bleu", "meteor", "cider"])
    """Metric names (``ALL_METRICS``; ``bleu`` means bleu1..bleu4)."""
    preprocess: bool = True
    """Apply the official ImageCLEFmedical ``preprocess`` before the text metrics."""
    ptb_tokenize: bool = False
    """Tokenise with the Stanford PTB tokenizer before BLEU/METEOR/ROUGE-L/CIDEr (COCO protocol; Java)."""
    empty_pair: Literal["preprocessed", "raw"] = "preprocessed"
    """When a pair counts as "both empty" (score 1): after preprocessing, or only when the raw
    strings are empty (what the official evaluator code checks; the two differ only for captions
    made of punctuation alone)."""
    bertscore_model: str = "microsoft/deberta-xlarge-mnli"
    """Hub id or local folder of the BERTScore model (offline: a local folder)."""
    bertscore_layers: int | None = None
    """Hidden layer to use; ``None`` looks the model up in bert-score's table (deberta-xlarge-mnli: 40)."""
    bertscore_idf: bool = False
    """Weight tokens by idf computed from the (preprocessed) references (ImageCLEFmedical 2025)."""
    bertscore_batch_size: int = 64
    """Sentences per embedding batch (the greedy matching is always per pair)."""
    bertscore_max_length: int = 512
    """Token limit set on tokenizers that declare none (deberta-xlarge-mnli must be set by hand)."""
    device: str | None = None
    """``cpu``, ``cuda`` ...; ``None`` takes CUDA when available."""
    bleurt_model: str | None = None
    """BLEURT checkpoint folder (e.g. a local copy of lucadiliello/BLEURT-20-D12)."""
    bleurt_batch_size: int = 8
    clip_model: str | None = None
    """CLIP-type model folder (transformers ``CLIPModel``) for CLIPScore / RefCLIPScore."""
    clip_batch_size: int = 32
    show_progress: bool = True
    """Show tqdm progress bars."""

    def __post_init__(self) -> None:
        names = set(ALL_METRICS) | set(_GROUPS)
        unknown = [m for m in self.metrics if m not in names]
        if unknown:
            raise ValueError(
                f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(sorted(names))}"
            )

    def expanded_metrics(self) -> list[str]:
        """The requested metrics with groups (``bleu``) expanded, in ``ALL_METRICS`` order."""
        wanted: set[str] = set()
        for m in self.metrics:
            wanted.update(_GROUPS.get(m, (m,)))
        return [m for m in ALL_METRICS if m in wanted]


class CaptionScores(dict[str, list[float]]):
    """Per-caption scores: ``{metric: [score of pair 0, pair 1, ...]}`` plus what else is known.

    ``unavailable`` maps a metric that could not be computed to the reason; ``corpus`` holds
    corpus-level values that are not the mean of the per-caption ones (corpus BLEU);
    ``models`` says which model and settings produced each model-based metric.
    """

    def __init__(self) -> None:
        super().__init__()
        self.unavailable: dict[str, str] = {}
        self.corpus: dict[str, float] = {}
        self.models: dict[str, str] = {}


def java_missing_reason() -> str | None:
    """Why the Java-based metrics cannot run, or ``None`` when ``java`` is on PATH."""
    if shutil.which("java") is None:
        return "Java not found on PATH (install a JRE, e.g. Debian's openjdk-17-jre-headless)"
    return None


def _one_line(text: str) -> str:
    # The Java tools read one caption per line; Unicode line separators would shift every score.
    return " ".join(text.split())


def _ptb_tokenize(texts: Sequence[str]) -> list[str]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    lines = [_one_line(t) for t in texts]
    # Empty lines are left out: the wrapper strips trailing newlines, which would drop them.
    full = [i for i, t in enumerate(lines) if t]
    out = [""] * len(lines)
    if not full:
        return out
    tokenized = PTBTokenizer().tokenize({i: [{"caption": lines[i]}] for i in full})
    if len(tokenized) != len(full):
        raise RuntimeError(f"PTB tokenizer returned {len(tokenized)} lines for {len(full)} captions")
    for i in full:
        out[i] = tokenized[i][0]
    return out


def _coco_scores(
    metric: str, gts: dict[int, list[str]], res: dict[int, list[str]]
) -> tuple[float, list[float]] | tuple[list[float], list[list[float]]]:
    if metric == "bleu":
        from pycocoevalcap.bleu.bleu import Bleu

        return Bleu(4).compute_score(gts, res, verbose=0)
    if metric == "meteor":
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()
        try:
            return scorer.compute_score(gts, res)
        finally:
            del scorer
    if metric == "cider":
        from pycocoevalcap.cider.cider import Cider

        return Cider().compute_score(gts, res)
    if metric == "rougeL":
        from pycocoevalcap.rouge.rouge import Rouge

        return Rouge().compute_score(gts, res)
    raise ValueError(metric)


def _bleurt_scores(preds: list[str], refs: list[str], cfg: MetricsConfig) -> list[float]:
    import torch

    path = cfg.bleurt_model
    assert path is not None
    config_file = Path(path) / "config.json"
    model_type = ""
    if config_file.is_file():
        import json

        model_type = json.loads(config_file.read_text()).get("model_type", "")
    if model_type == "bleurt":
        try:
            from bleurt_pytorch import BleurtForSequenceClassification, BleurtTokenizer
        except ImportError as e:
            raise RuntimeError(
                f"{path} is a BLEURT-20 checkpoint, which needs the bleurt_pytorch package "
                "(pip install git+https://github.com/lucadiliello/bleurt-pytorch)"
            ) from e
        tokenizer = BleurtTokenizer.from_pretrained(path)
        model = BleurtForSequenceClassification.from_pretrained(path)
    else:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    scores: list[float] = []
    starts = range(0, len(refs), cfg.bleurt_batch_size)
    for s in tqdm(starts, desc="BLEURT", disable=not cfg.show_progress, leave=False):
        inputs = tokenizer(
            refs[s : s + cfg.bleurt_batch_size],
            preds[s : s + cfg.bleurt_batch_size],
            padding="longest",
            truncation=True,
            max_length=512,
            return_tensors="pt",
        )
        with torch.no_grad():
            logits = model(**{k: v.to(device) for k, v in inputs.items()}).logits
        scores.extend(logits[:, 0].float().cpu().tolist())
    return scores


def _clip_scores(
    preds: list[str], refs: list[str], images: Sequence[Any], cfg: MetricsConfig
) -> tuple[list[float], list[float]]:
    """CLIPScore and RefCLIPScore of each pair (Hessel et al. 2021, w = 2.5)."""
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    path = cfg.clip_model
    assert path is not None
    model = CLIPModel.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    # The PIL backend: the default torchvision one is not installed (and must not be).
    image_processor = AutoImageProcessor.from_pretrained(path, backend="pil")
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    max_len = min(
        int(getattr(tokenizer, "model_max_length", 77)), model.config.text_config.max_position_embeddings
    )

    def texts(batch: list[str]) -> torch.Tensor:
        enc = tokenizer(batch, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        with torch.no_grad():
            out = model.get_text_features(
                input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device)
            )
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        return torch.nn.functional.normalize(feats.float(), dim=-1).cpu()

    def pictures(batch: Sequence[Any]) -> torch.Tensor:
        pil = []
        for im in batch:
            if isinstance(im, Image.Image):
                pil.append(im.convert("RGB"))
            else:
                with Image.open(im) as opened:
                    pil.append(opened.convert("RGB"))
        pixels = image_processor(images=pil, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            out = model.get_image_features(pixel_values=pixels.to(device))
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        return torch.nn.functional.normalize(feats.float(), dim=-1).cpu()

    clip: list[float] = []
    ref_clip: list[float] = []
    bs = cfg.clip_batch_size
    for s in tqdm(range(0, len(preds), bs), desc="CLIPScore", disable=not cfg.show_progress, leave=False):
        c = texts(preds[s : s + bs])
        r = texts(refs[s : s + bs])
        v = pictures(images[s : s + bs])
        cs = 2.5 * torch.clamp((c * v).sum(-1), min=0)
        rs = torch.clamp((c * r).sum(-1), min=0)
        for k, pred in enumerate(preds[s : s + bs]):
            if not pred.strip():
                # Official 2025 rule: an empty candidate has similarity 0.
                clip.append(0.0)
                ref_clip.append(0.0)
                continue
            a, b = float(cs[k]), float(rs[k])
            clip.append(a)
            ref_clip.append(2 * a * b / (a + b) if a + b > 0 else 0.0)
    return clip, ref_clip


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(e).__name__}: {first}"[:500]


def score_captions(
    predictions: Sequence[str],
    references: Sequence[str],
    cfg: MetricsConfig | None = None,
    images: Sequence[Any] | None = None,
    idf_references: Sequence[str] | None = None,
    bertscore: BertScoreExact | None = None,
) -> CaptionScores:
    """Score each (prediction, reference) pair with every metric of ``cfg``.

    ``images`` (paths or PIL images, aligned with the pairs) are needed only by CLIPScore.
    ``idf_references`` are the sentences the BERTScore idf weights come from when
    ``cfg.bertscore_idf`` (default: ``references``; the official 2025 evaluator uses every
    ground-truth caption). ``bertscore`` reuses an already loaded model.

    Returns ``CaptionScores``: ``{metric: [score per pair]}`` with ``.unavailable`` reasons,
    ``.corpus`` values and ``.models`` descriptions.
    """
    cfg = cfg or MetricsConfig()
    preds, refs = list(predictions), list(references)
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references: they must pair up")
    if images is not None and len(images) != len(refs):
        raise ValueError(f"{len(images)} images but {len(refs)} caption pairs")
    result = CaptionScores()
    wanted = cfg.expanded_metrics()
    n = len(refs)
    if n == 0:
        for m in wanted:
            result[m] = []
        return result

    clean = preprocess if cfg.preprocess else (lambda t: t)
    p_clean = [clean(t) for t in preds]
    r_clean = [clean(t) for t in refs]
    if cfg.empty_pair == "raw":
        both_empty = [p == "" and r == "" for p, r in zip(preds, refs, strict=True)]
    else:
        both_empty = [not p.strip() and not r.strip() for p, r in zip(p_clean, r_clean, strict=True)]
    # Pairs that are scored by the metrics themselves; both-empty pairs get 1.
    todo = [i for i in range(n) if not both_empty[i]]

    def fill(values: list[float]) -> list[float]:
        out = [1.0] * n
        for i, v in zip(todo, values, strict=True):
            out[i] = float(v)
        return out

    tp = [p_clean[i] for i in todo]
    tr = [r_clean[i] for i in todo]

    if "bertscore" in wanted:
        try:
            scorer = bertscore or BertScoreExact(
                cfg.bertscore_model,
                cfg.bertscore_layers,
                device=cfg.device,
                batch_size=cfg.bertscore_batch_size,
                max_length=cfg.bertscore_max_length,
            )
            if cfg.bertscore_idf:
                idf_src = [clean(t) for t in (idf_references if idf_references is not None else refs)]
                idf = scorer.idf_from(idf_src)
                idf_note = f"idf from {len(idf_src)} preprocessed references"
            else:
                idf, idf_note = scorer.plain_idf(), "no idf"
            _, _, f1 = (
                scorer.score(tp, tr, idf=idf, show_progress=cfg.show_progress) if todo else ([], [], [])
            )
            result["bertscore"] = fill(f1)
            result.models["bertscore"] = (
                f"{scorer.model_type} (layer {scorer.num_layers}, {idf_note}, no baseline rescaling, F1)"
            )
        except Exception as e:  # a missing model must not stop the other metrics
            result.unavailable["bertscore"] = f"could not load or run {cfg.bertscore_model!r}: {_reason(e)}"

    if "rouge1" in wanted:
        from rouge_score import rouge_scorer

        rs = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)
        result["rouge1"] = fill([rs.score(r, p)["rouge1"].fmeasure for p, r in zip(tp, tr, strict=True)])

    coco = [
        m for m in ("bleu", "meteor", "rougeL", "cider") if any(x in wanted for x in _GROUPS.get(m, (m,)))
    ]
    if coco:
        why = java_missing_reason() if ("meteor" in coco or cfg.ptb_tokenize) else None
        try:
            if cfg.ptb_tokenize and todo:
                if why:
                    raise RuntimeError(why)
                ctp, ctr = _ptb_tokenize(tp), _ptb_tokenize(tr)
            else:
                ctp, ctr = [_one_line(t) for t in tp], [_one_line(t) for t in tr]
        except Exception as e:
            for m in coco:
                for x in _GROUPS.get(m, (m,)):
                    result.unavailable[x] = f"PTB tokenisation failed: {_reason(e)}"
            coco, ctp, ctr = [], [], []
        gts = {i: [t] for i, t in enumerate(ctr)}
        res = {i: [t] for i, t in enumerate(ctp)}
        for m in coco:
            names = _GROUPS.get(m, (m,))
            if m == "meteor" and why:
                result.unavailable["meteor"] = why
                continue
            if not todo:
                for x in names:
                    result[x] = fill([])
                continue
            try:
                corpus, per = _coco_scores(m, gts, res)
            except Exception as e:
                for x in names:
                    result.unavailable[x] = f"pycocoevalcap {m} failed: {_reason(e)}"
                continue
            if m == "bleu":
                for k, x in enumerate(names):
                    result[x] = fill(list(per[k]))
                    result.corpus[f"{x}_corpus"] = float(corpus[k])
            else:
                result[m] = fill([float(v) for v in per])

    if "bleurt" in wanted:
        if not cfg.bleurt_model:
            result.unavailable["bleurt"] = "no BLEURT model given (--bleurt-model PATH)"
        else:
            try:
                result["bleurt"] = fill(_bleurt_scores(tp, tr, cfg) if todo else [])
                result.models["bleurt"] = cfg.bleurt_model
            except Exception as e:
                result.unavailable["bleurt"] = f"could not load or run {cfg.bleurt_model!r}: {_reason(e)}"

    clip_wanted = [m for m in ("clipscore", "refclipscore") if m in wanted]
    if clip_wanted:
        why = None
        if not cfg.clip_model:
            why = "no CLIP model given (--clip-model PATH)"
        elif images is None:
            why = "no images to score against (references without image paths; pass --images DIR)"
        if why:
            for m in clip_wanted:
                result.unavailable[m] = why
        else:
            try:
                # CLIP sees the raw captions: its tokenizer does its own normalisation, and the
                # official 2025 similarity also encodes the raw candidate.
                raw_p = [preds[i] for i in todo]
                raw_r = [refs[i] for i in todo]
                imgs = [images[i] for i in todo]
                cs, rcs = _clip_scores(raw_p, raw_r, imgs, cfg) if todo else ([], [])
                if "clipscore" in clip_wanted:
                    result["clipscore"] = fill(cs)
                if "refclipscore" in clip_wanted:
                    result["refclipscore"] = fill(rcs)
                result.models["clipscore"] = f"{cfg.clip_model} (2.5 * max(cos, 0))"
            except Exception as e:
                for m in clip_wanted:
                    result.unavailable[m] = f"could not load or run {cfg.clip_model!r}: {_reason(e)}"

    for m, values in result.items():
        bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
        if bad:
            print(f"warning: {m} is not finite for {len(bad)} pair(s), e.g. pair {bad[0]}", file=sys.stderr)
    # Keep ALL_METRICS order in the mapping so tables read the same every time.
    ordered = CaptionScores()
    ordered.unavailable, ordered.corpus, ordered.models = result.unavailable, result.corpus, result.models
    for m in ALL_METRICS:
        if m in result:
            ordered[m] = result[m]
    return ordered
