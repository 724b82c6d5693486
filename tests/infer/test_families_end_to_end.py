"""The unchanged data -> train -> predict -> evaluate -> compare -> serve path with two of the new
families (Qwen2.5-VL with a pixel cap, PaliGemma), on their tiny models and tiny prepared data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from medcap.config.run import load_run_config
from medcap.eval.compare import compare
from medcap.eval.evaluate import evaluate
from medcap.infer.generate import caption_images, load_captioner
from medcap.infer.predict import predict
from medcap.train.recipe import fit
from tests.eval.test_metrics import minilm_path
from tests.fixtures import make_prepared, tiny_overrides

FAMILIES = {
    "qwen": ["--model.name_or_path", "tiny-qwen2.5-vl", "--model.max_pixels", "4096"],
    "paligemma": ["--model.name_or_path", "tiny-paligemma", "--model.prompt", "caption en"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two trained runs (a few steps each) of different families on the same data, predicted and evaluated."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("e2e")
    prepared = make_prepared(root / "prepared", n_train=8, n_valid=6)
    out = {}
    for name, model_args in FAMILIES.items():
        run = root / name
        args = tiny_overrides(prepared, run, epochs=1, batch_size=4) + model_args
        cfg = load_run_config(None, args + ["--model.peft.targets", "lm-attn"])
        fit(cfg)
        captioner = load_captioner(checkpoint=run, device="cpu")
        result = predict(
            captioner, prepared / "valid" / "manifest.csv", run / "predictions" / "valid.csv", progress=False
        )
        assert result.images == 6 and not result.errors and not result.unreadable
        refs = root / "valid_captions.csv"
        refs.write_text(
            "ID,Caption\n" + "".join(f'{p.stem},"{c}"\n' for p, c in _references(prepared)), encoding="utf-8"
        )
        evaluate(
            result.submission,
            refs,
            "imageclef2024",
            run / "eval" / "valid",
            bertscore_model=minilm_path(),
            bertscore_layers=6,
            bootstrap=200,
            show_progress=False,
        )
        out[name] = (run, captioner)
    return out


def _references(prepared: Path) -> list[tuple[Path, str]]:
    from medcap.data.manifest import read_manifest

    return [(Path(r.image), r.caption) for r in read_manifest(prepared / "valid" / "manifest.csv")]


def test_runs_of_different_families_predict_evaluate_and_compare(runs):
    (run_a, cap_a), (run_b, cap_b) = runs["qwen"], runs["paligemma"]
    assert cap_a.family.name == "qwen2.5-vl" and cap_b.family.name == "paligemma"
    assert cap_a.processor.image_processor.size.longest_edge == 4096  # the cap came with the checkpoint
    assert cap_b.prompt == "caption en"
    result = compare(run_a, run_b, samples=200, split="valid")
    assert result["n"] == 6 and not result["warnings"]
    assert {"bertscore", "rouge1"} <= set(result["metrics"])


def test_the_service_captions_with_the_checkpoint_and_refuses_an_image_beyond_the_family_limit(runs):
    from fastapi.testclient import TestClient

    from medcap.infer.serve.app import create_app
    from medcap.infer.serve.loading import load_for_serving

    run, _ = runs["qwen"]
    model, processor, gen, prompt, info = load_for_serving(checkpoint=run, device="cpu")
    app = create_app(model, processor, gen_defaults=gen, prompt=prompt, info=info)
    good = Image.new("RGB", (300, 200), (120, 30, 30))
    strip = Image.new("RGB", (2010, 10), (120, 30, 30))
    with TestClient(app) as client:
        import io

        def png(im: Image.Image) -> bytes:
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            return buf.getvalue()

        r = client.post("/v1/captions", files={"files": ("scan.png", png(good), "image/png")})
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["caption"] == caption_images(model, processor, [good], gen, prompt)[0]
        r = client.post("/v1/captions", files={"files": ("strip.png", png(strip), "image/png")})
        assert r.status_code == 422, r.text
        assert "strip.png" in r.json()["detail"] and "aspect ratios up to 200:1" in r.json()["detail"]


def test_exports_of_other_families_load_and_caption_as_the_checkpoint(runs, tmp_path):
    """`medcap export` for the new families: a merged PaliGemma loads with plain transformers and its
    card's own snippet (run as written) captions as medcap does; a Qwen2.5-VL adapter on its shipped
    base/ captions as the checkpoint; both cards carry the evaluated metrics with their intervals."""
    import json
    import re

    from huggingface_hub import ModelCard

    from medcap.infer.export import export
    from medcap.infer.serve.loading import load_for_serving

    image = Image.new("RGB", (64, 48), (90, 140, 60))
    image_path = tmp_path / "image.jpg"
    image.save(image_path)
    run_p, cap_p = runs["paligemma"]
    merged = export(run_p / "checkpoints" / "best", tmp_path / "paligemma", merge=True)
    card = ModelCard.load(merged / "README.md")
    assert card.data.library_name == "transformers" and card.data.base_model is None  # a tiny base
    summary = json.loads((run_p / "eval" / "valid" / "metrics.json").read_text(encoding="utf-8"))
    listed = {r.metric_name for r in card.data.eval_results}
    assert listed == set(summary["metrics"]) | set(summary["corpus"])
    lo, hi = summary["metrics"]["bertscore"]["ci95"]
    assert (
        f"| bertscore | {summary['metrics']['bertscore']['mean']:.4f} | {lo:.4f} to {hi:.4f} |" in card.text
    )
    snippet = re.search(r"```python\n(.*?)```", card.text, re.S).group(1)
    assert "PaliGemmaForConditionalGeneration" in snippet and "add_special_tokens=False" in snippet
    snippet = snippet.replace("PATH_TO_THIS_FOLDER", str(merged)).replace("image.jpg", str(image_path))
    scope: dict = {}
    exec(compile(snippet, "card", "exec"), scope)  # noqa: S102 - the card's snippet, as a user runs it
    # It feeds the model exactly what medcap feeds it, and the exported weights are the checkpoint's.
    ours = cap_p.family.generation_inputs(cap_p.processor, [Image.open(image_path)], cap_p.prompt)
    assert set(ours) <= set(scope["inputs"])
    for key, value in ours.items():
        assert torch.equal(value, scope["inputs"][key]), key
    with torch.no_grad():
        theirs = scope["model"](**scope["inputs"]).logits
        assert torch.allclose(cap_p.model(**ours).logits, theirs, atol=1e-5)
    # `medcap serve --model EXPORT`: the prompt and decoding defaults come from medcap_config.yaml.
    model, processor, gen, prompt, _ = load_for_serving(model=str(merged), device="cpu")
    assert prompt == cap_p.prompt == "caption en" and gen == cap_p.gen
    assert caption_images(model, processor, [image], gen, prompt) == cap_p.caption([image])
    # `medcap caption --model EXPORT` and predict too (they used to caption with an empty prompt).
    from_export = load_captioner(model=str(merged), device="cpu")
    assert (from_export.prompt, from_export.gen) == (cap_p.prompt, cap_p.gen)

    run_q, cap_q = runs["qwen"]
    adapter = export(run_q / "checkpoints" / "best", tmp_path / "qwen")
    assert (adapter / "base" / "config.json").is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        (adapter / "base").resolve()
    )
    card = ModelCard.load(adapter / "README.md")
    assert card.data.library_name == "peft" and "Qwen2_5_VLForConditionalGeneration" in card.text
    assert "<|im_start|>" in card.text  # the chat template's text, not the bare prompt
    model, processor, gen, prompt, info = load_for_serving(adapter=str(adapter), device="cpu")
    assert info["base"] == str((adapter / "base").resolve()) and prompt == cap_q.prompt
    assert caption_images(model, processor, [image], gen, prompt) == cap_q.caption([image])
