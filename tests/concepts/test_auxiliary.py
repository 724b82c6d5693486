"""The auxiliary concept head of a caption run (``train.concept_loss_weight``): its loss reaches the
Q-Former, it is saved with the checkpoint and restored on resume, and it is refused where it cannot work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medcap.config.loader import ConfigError
from medcap.config.run import load_run_config
from medcap.model.checkpoint import load_tensors
from medcap.train.errors import TrainingError
from medcap.train.recipe import fit
from tests.fixtures import one_thread, tiny_overrides

_ = one_thread
pytestmark = pytest.mark.usefixtures("one_thread")


def _run(prepared: Path, out: Path, weight: float, **extra: object) -> dict:
    over = tiny_overrides(prepared, out, max_steps=3, epochs=1, **{"model.full_finetune": "true",
                          "model.peft.method": "none", "train.concept_loss_weight": weight,
                          "train.concept_min_freq": 2, "train.num_sample_captions": 0, **extra})  # fmt: skip
    return fit(load_run_config(None, over))


def test_the_auxiliary_loss_trains_the_qformer_and_is_checkpointed(
    phantom_prepared: Path, tmp_path: Path
) -> None:
    _run(phantom_prepared, tmp_path / "plain", 0.0)
    result = _run(phantom_prepared, tmp_path / "aux", 5.0)
    assert result["concept_vocabulary"] > 5 and result["concept_loss_last"] > 0
    last = tmp_path / "aux" / "checkpoints" / "last"
    assert (last / "concept_head.safetensors").is_file()
    vocab = json.loads((last / "concept_vocab.json").read_text())
    assert len(vocab["cuis"]) == result["concept_vocabulary"]
    plain = load_tensors(tmp_path / "plain" / "checkpoints" / "last" / "trainable.safetensors")
    aux = load_tensors(last / "trainable.safetensors")
    q = [k for k in plain if k.startswith("qformer.") or k == "query_tokens"]
    lm = [k for k in plain if "language_model" in k]
    # Same seed, same data: only the auxiliary gradient can make the Q-Former differ ...
    assert any(not torch.equal(plain[k], aux[k]) for k in q)
    assert not (tmp_path / "plain" / "checkpoints" / "last" / "concept_head.safetensors").exists()
    assert lm  # ... (the language model differs too, downstream of the queries)

    # Resume: the head comes back from the checkpoint and training goes on.
    head_before = load_tensors(last / "concept_head.safetensors")
    over = ["--train.resume", "true", "--train.max_steps", "6"]
    cfg = load_run_config(tmp_path / "aux" / "config.yaml", over)
    fit(cfg)
    head_after = load_tensors(last / "concept_head.safetensors")
    assert any(not torch.equal(head_before[k], head_after[k]) for k in head_before)


def test_refused_where_it_cannot_work(phantom_prepared: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="query cache"):
        load_run_config(None, ["--train.concept_loss_weight", "1", "--train.query_cache", str(tmp_path)])
    # LoRA on the language model only: nothing the auxiliary loss could change.
    over = tiny_overrides(
        phantom_prepared, tmp_path / "lora", max_steps=1, **{"train.concept_loss_weight": 1}
    )
    with pytest.raises(TrainingError, match="train_qformer"):
        fit(load_run_config(None, over))
