"""Captioning with the tiny BLIP-2 (random weights, nothing trained): batching, decoding options,
``medcap caption`` on folders with bad files, and ``medcap predict`` writing a valid submission."""

from __future__ import annotations

import csv
import json
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from pydicom.data import get_testdata_file

from medcap.cli.infer import cmd_caption as cli_caption
from medcap.cli.infer import cmd_predict as cli_predict
from medcap.config.generate import GenerateConfig
from medcap.config.loader import ConfigError, from_dict, to_dict
from medcap.config.model import ModelConfig, PeftSettings
from medcap.data.manifest import MANIFEST_COLUMNS
from medcap.eval.submission import check_submission
from medcap.infer.caption import collect_image_files
from medcap.infer.generate import caption_images, generate_token_ids, load_captioner
from medcap.layout import resolve_checkpoint
from medcap.model.build import build_model
from medcap.model.checkpoint import save_trainable
from medcap.model.families import family_of as model_family


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread: a 0.6M-parameter model gains nothing from more, and on a shared 2-core box
    extra threads contend (generate() calls took 15x longer with the default here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _randomize(model: torch.nn.Module, seed: int, std: float = 0.3) -> None:
    """Large random weights: the default init (std 0.02) makes every image give the same caption,
    which would let a batching bug pass unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 or "query_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _images(n: int, seed: int = 0, size: int = 64) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size + 8 * i, 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="module")
def opt():
    """The tiny BLIP-2 with OPT and a LoRA adapter, all weights random and large."""
    cfg = ModelConfig(name_or_path="tiny", peft=PeftSettings(method="lora", r=4, targets="lm-qv"))
    model, processor = build_model(cfg, verbose=False)
    _randomize(model, seed=0)
    return model, processor, cfg


@pytest.fixture(scope="module")
def run_dir(opt, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder as training leaves it (config.yaml, checkpoints/best) and its prepared data."""
    model, _, cfg = opt
    root = tmp_path_factory.mktemp("predict")
    prepared = root / "prepared"
    (prepared / "test").mkdir(parents=True)
    images = _images(5, seed=1)
    with (prepared / "test" / "manifest.csv").open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
        w.writeheader()
        for i, im in enumerate(images):
            path = prepared / "test" / f"ROCOv2_2023_test_{i:06d}.png"
            im.save(path)
            w.writerow(
                {
                    "id": f"ROCOv2_2023_test_{i:06d}",
                    "image": str(path.resolve()),
                    "caption_raw": f"reference {i}, with a comma",
                    "caption": f"reference {i}, with a comma",
                    "cuis": "",
                    "modality": "ct",
                    "width": im.width,
                    "height": im.height,
                    "mode": "RGB",
                    "true_color": 1,
                }
            )
    run = root / "run"
    ckpt = run / "checkpoints" / "best"
    save_trainable(model, ckpt)
    run_cfg = {
        "data": {"prepared": str(prepared)},
        "model": to_dict(cfg),
        "generate": to_dict(GenerateConfig(max_new_tokens=12, batch_size=2)),
    }
    for where in (run, ckpt):
        (where / "config.yaml").write_text(yaml.safe_dump(run_cfg), encoding="utf-8")
    return run


# ----------------------------------------------------------------------------------------------
# GenerateConfig


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"num_beams": 0}, "num_beams: must be at least 1"),
        ({"max_new_tokens": 0}, "max_new_tokens: must be at least 1"),
        ({"min_new_tokens": -1}, "min_new_tokens: must be 0 or more"),
        (
            {"min_new_tokens": 50, "max_new_tokens": 40},
            "min_new_tokens (50) is larger than max_new_tokens (40)",
        ),
        ({"top_p": 0.0}, "top_p: must be in (0, 1]"),
        ({"top_p": 1.5}, "top_p: must be in (0, 1]"),
        ({"temperature": 0.0}, "temperature: must be a finite number of at least 0.01"),
        ({"repetition_penalty": 0.0}, "repetition_penalty: must be a finite number of at least 0.01"),
        ({"no_repeat_ngram_size": -2}, "no_repeat_ngram_size: must be 0"),
        ({"batch_size": 0}, "batch_size: must be at least 1"),
        ({"top_k": -1}, "top_k: must be 0"),
        ({"do_sample": True, "num_beams": 4}, "choose beam search"),
    ],
)
def test_generate_config_is_validated(settings: dict, message: str) -> None:
    with pytest.raises(
        ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")
    ):
        GenerateConfig(**settings)
    # The same error from a YAML run config, with the section named.
    with pytest.raises(ConfigError, match="generate"):
        from_dict(_RunWithGenerate, {"generate": settings})


@dataclass
class _RunWithGenerate:
    """A run config's generate section, as train.RunConfig holds it."""

    generate: GenerateConfig = field(default_factory=GenerateConfig)


def test_generate_kwargs_per_mode() -> None:
    greedy = GenerateConfig().generate_kwargs()
    assert greedy["num_beams"] == 1 and greedy["do_sample"] is False
    assert "top_p" not in greedy and "length_penalty" not in greedy
    beam = GenerateConfig(num_beams=5, length_penalty=0.5, min_new_tokens=8, max_new_tokens=30)
    assert beam.mode == "beam"
    kw = beam.generate_kwargs()
    assert kw["num_beams"] == 5 and kw["length_penalty"] == 0.5 and kw["min_new_tokens"] == 8
    nucleus = GenerateConfig(do_sample=True, top_p=0.8, temperature=0.7)
    assert nucleus.mode == "nucleus"
    kw = nucleus.generate_kwargs()
    assert kw["top_p"] == 0.8 and kw["temperature"] == 0.7 and kw["top_k"] == 0  # transformers would use 50
    assert "nucleus" in nucleus.describe() and "beams=5" in beam.describe()


# ----------------------------------------------------------------------------------------------
# caption_images


def test_batch_gives_the_same_captions_as_one_at_a_time(opt) -> None:
    model, processor, _ = opt
    images = _images(6)
    for gen in (
        GenerateConfig(max_new_tokens=10, batch_size=4),
        GenerateConfig(max_new_tokens=10, batch_size=6, num_beams=3),
        GenerateConfig(max_new_tokens=10, batch_size=3, repetition_penalty=1.3, no_repeat_ngram_size=2),
    ):
        batched = caption_images(model, processor, images, gen)
        single = [caption_images(model, processor, [im], gen)[0] for im in images]
        assert batched == single, gen.describe()
        # The test can fail: the captions depend on the image.
        assert len(set(batched)) >= 4, batched


def test_batch_equals_single_with_a_prompt_and_for_t5() -> None:
    model, processor = build_model(
        ModelConfig(name_or_path="tiny-t5", peft=PeftSettings(method="none")), verbose=False
    )
    _randomize(model, seed=3)
    assert model_family(model).name == "blip2-t5"
    images = _images(5, seed=2)
    gen = GenerateConfig(max_new_tokens=8, batch_size=5)
    batched = caption_images(model, processor, images, gen, prompt="an image of")
    single = [caption_images(model, processor, [im], gen, prompt="an image of")[0] for im in images]
    assert batched == single and len(set(batched)) >= 3


def test_prompt_is_sliced_off(opt) -> None:
    """FACTS 3: OPT's generate() returns the prompt too; the caption must not contain it."""
    from medcap.model.families import BLIP2_OPT

    model, processor, _ = opt
    images = _images(2)
    prompt = "radiograph of"
    gen = GenerateConfig(max_new_tokens=6)
    inputs = BLIP2_OPT.generation_inputs(processor, images, prompt)
    with torch.inference_mode():
        full = model.generate(
            **inputs, **gen.generate_kwargs(), pad_token_id=processor.tokenizer.pad_token_id
        )
    full_text = processor.tokenizer.batch_decode(full, skip_special_tokens=True)
    captions = caption_images(model, processor, images, gen, prompt=prompt)
    for whole, caption in zip(full_text, captions, strict=True):
        assert whole.startswith(prompt)
        assert " ".join(whole[len(prompt) :].split()) == caption


def test_max_and_min_new_tokens(opt) -> None:
    model, processor, _ = opt
    images = _images(3)
    ids = generate_token_ids(model, processor, images, GenerateConfig(max_new_tokens=3))
    assert all(len(x) <= 3 for x in ids) and any(len(x) == 3 for x in ids)
    # Make the model want to stop at once: an end-of-caption logit far above the rest.
    eos = processor.tokenizer.eos_token_id
    head = model.get_base_model().language_model.get_output_embeddings()

    pad = processor.tokenizer.pad_token_id

    def push_eos(_module, _inputs, output):
        output[..., eos] += 1e4
        # Keep the forced tokens real: with EOS held back, a random model's next best may be the
        # pad token, which caption decoding drops (it happened with one of these random models).
        output[..., pad] -= 1e4
        return output

    handle = head.register_forward_hook(push_eos)
    try:
        assert caption_images(model, processor, images, GenerateConfig(max_new_tokens=8)) == ["", "", ""]
        ids = generate_token_ids(model, processor, images, GenerateConfig(min_new_tokens=4, max_new_tokens=8))
        assert [len(x) for x in ids] == [4, 4, 4]
    finally:
        handle.remove()


def test_repetition_options_change_the_output(opt) -> None:
    model, processor, _ = opt
    images = _images(6)
    plain = generate_token_ids(model, processor, images, GenerateConfig(max_new_tokens=16))
    repeats = sum(len(x) - len(set(x)) for x in plain)
    assert repeats > 0  # random weights repeat themselves a lot
    no_repeat = generate_token_ids(
        model, processor, images, GenerateConfig(max_new_tokens=16, no_repeat_ngram_size=1)
    )
    assert all(len(x) == len(set(x)) for x in no_repeat)
    penalised = generate_token_ids(
        model, processor, images, GenerateConfig(max_new_tokens=16, repetition_penalty=3.0)
    )
    assert sum(len(x) - len(set(x)) for x in penalised) < repeats


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(opt) -> None:
    model, processor, _ = opt
    images = _images(4)
    gen = GenerateConfig(do_sample=True, top_p=0.95, max_new_tokens=10, batch_size=4, seed=7)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = caption_images(model, processor, images, gen)
    assert torch.equal(torch.get_rng_state(), state)
    assert caption_images(model, processor, images, gen) == first
    other = caption_images(model, processor, images, GenerateConfig(**{**gen.__dict__, "seed": 8}))
    greedy = caption_images(model, processor, images, GenerateConfig(max_new_tokens=10))
    assert other != first and greedy != first


def test_eval_mode_is_restored(opt) -> None:
    model, processor, _ = opt
    model.train()
    try:
        caption_images(model, processor, _images(1), GenerateConfig(max_new_tokens=2))
        assert model.training
    finally:
        model.eval()


# ----------------------------------------------------------------------------------------------
# Loading


def test_resolve_checkpoint(run_dir: Path, tmp_path: Path) -> None:
    best = run_dir / "checkpoints" / "best"
    assert resolve_checkpoint(run_dir) == (best, run_dir)
    assert resolve_checkpoint(best) == (best, run_dir)
    with pytest.raises(FileNotFoundError, match="neither a checkpoint folder"):
        resolve_checkpoint(tmp_path)


def test_checkpoint_loads_with_its_prompt_and_decoding(opt, run_dir: Path) -> None:
    model, processor, _ = opt
    cap = load_captioner(checkpoint=run_dir, device="cpu")
    assert cap.gen.max_new_tokens == 12 and cap.gen.batch_size == 2
    assert cap.run_dir == run_dir and cap.info["adapter"].endswith("adapter")
    images = _images(3)
    assert cap.caption(images) == caption_images(model, processor, images, cap.gen)


def test_base_model_with_adapter(run_dir: Path) -> None:
    from peft import PeftModel

    adapter = run_dir / "checkpoints" / "best" / "adapter"
    cap = load_captioner(model="tiny", adapter=adapter, device="cpu")
    assert isinstance(cap.model, PeftModel) and cap.info == {
        "base": "tiny",
        "adapter": str(adapter),
        "checkpoint": None,
        "device": "cpu",
    }
    assert len(cap.caption(_images(2), GenerateConfig(max_new_tokens=4))) == 2
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter folder"):
        load_captioner(model="tiny", adapter=run_dir)
    with pytest.raises(ValueError, match="not both"):
        load_captioner(model="tiny", checkpoint=run_dir)


# ----------------------------------------------------------------------------------------------
# medcap caption


def _folder_with_a_bad_file(root: Path) -> Path:
    folder = root / "images"
    (folder / "series").mkdir(parents=True)
    ims = _images(3, seed=5)
    ims[0].save(folder / "a.jpg")
    ims[1].save(folder / "b.png")
    ims[2].save(folder / "c.tif")
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "series" / "IM0001")  # DICOM without suffix
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"")
    return folder


def test_collect_image_files(tmp_path: Path) -> None:
    folder = _folder_with_a_bad_file(tmp_path)
    candidates, ignored = collect_image_files([folder, folder / "a.jpg"])
    assert sorted(p.name for p in candidates) == ["IM0001", "a.jpg", "b.png", "c.tif", "corrupt.jpg"]
    assert [p.name for p in ignored] == ["notes.txt"]


def test_caption_cli_folder_with_a_corrupt_file(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _folder_with_a_bad_file(tmp_path)
    out = tmp_path / "captions.csv"
    code = cli_caption([str(folder), "--checkpoint", str(run_dir), "--out", str(out), "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 1  # something was skipped
    assert "skipped " in captured.err and "corrupt.jpg" in captured.err
    assert "5 images in = 4 captioned + 1 skipped" in captured.err
    assert "1 non-image files in folders ignored" in captured.err
    with out.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(Path(r["file"]).name for r in rows) == ["IM0001", "a.jpg", "b.png", "c.tif"]
    # The same captions as the library gives for those images (DICOM read through medcap.images).
    from medcap.data.images import read_image

    cap = load_captioner(checkpoint=run_dir, device="cpu")
    files = [Path(r["file"]) for r in rows]
    assert [r["caption"] for r in rows] == cap.caption([read_image(f) for f in files])
    assert all(f"{r['file']}\t{r['caption']}" in captured.out for r in rows)


def test_caption_cli_all_good_and_decoding_options(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for i, im in enumerate(_images(2)):
        im.save(tmp_path / f"{i}.png")
    argv = [str(tmp_path / "0.png"), str(tmp_path / "1.png"), "--checkpoint", str(run_dir)]
    assert (
        cli_caption([*argv, "--num-beams", "2", "--max-new-tokens", "5", "--no-repeat-ngram-size", "2"]) == 0
    )
    err = capsys.readouterr().err
    assert (
        "beam, beams=2" in err and "new tokens 0-5" in err and "2 images in = 2 captioned + 0 skipped" in err
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--num-beams", "0"], "num_beams: must be at least 1"),
        (["--do-sample", "--num-beams", "3"], "choose beam search"),
        (["--top-p", "1.5"], "top_p"),
        (["--min-new-tokens", "9", "--max-new-tokens", "3"], "min_new_tokens (9) is larger"),
    ],
)
def test_caption_cli_rejects_bad_options_before_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as info:
        cli_caption([str(tmp_path), "--model", "no/such-model", *options])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_caption_cli_model_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli_caption([str(tmp_path)])  # neither --model nor --checkpoint
    assert "give --model" in capsys.readouterr().err
    (tmp_path / "x.png").write_bytes(b"")
    assert cli_caption([str(tmp_path), "--checkpoint", str(tmp_path / "nothing")]) == 2
    assert "cannot load the model" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_caption([str(empty), "--model", "tiny"]) == 1
    assert "no image files found" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# medcap predict


def test_predict_writes_a_valid_submission(opt, run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = run_dir.parent / "prepared" / "test" / "manifest.csv"
    code = cli_predict(
        ["--checkpoint", str(run_dir / "checkpoints" / "best"), "--split", "test", "--device", "cpu"]
    )
    err = capsys.readouterr().err
    assert code == 0, err
    out = run_dir / "predictions" / "test.csv"
    assert check_submission(out, manifest) == []
    assert "submission check OK" in err and "images/s" in err
    with out.open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    with manifest.open(encoding="utf-8", newline="") as f:
        manifest_rows = list(csv.DictReader(f))
    assert rows[0] == ["ID", "Caption"] and [r[0] for r in rows[1:]] == [m["id"] for m in manifest_rows]
    # The captions are the model's for those images, with the checkpoint's decoding settings.
    model, processor, _ = opt
    images = [Image.open(m["image"]).convert("RGB") for m in manifest_rows]
    assert [r[1] for r in rows[1:]] == caption_images(
        model, processor, images, GenerateConfig(max_new_tokens=12)
    )
    with zipfile.ZipFile(run_dir / "predictions" / "test.zip") as zf:
        assert zf.namelist() == ["submission.csv"] and zf.read("submission.csv") == out.read_bytes()
    meta = json.loads((run_dir / "predictions" / "test.meta.json").read_text())
    assert meta["images"] == 5 and meta["generate"]["max_new_tokens"] == 12 and meta["unreadable"] == []


def test_predict_options_and_unreadable_image(run_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    # Copy the prepared split and break one image: it gets an empty caption, the file stays valid.
    prepared = tmp_path / "prepared"
    shutil.copytree(run_dir.parent / "prepared", prepared)
    manifest = prepared / "test" / "manifest.csv"
    with manifest.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:  # point the copy's manifest at the copied images, never at the shared fixture's
        r["image"] = str(prepared / "test" / Path(r["image"]).name)
    with manifest.open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    Path(rows[2]["image"]).unlink()
    out = tmp_path / "preds" / "beam.csv"
    argv = ["--checkpoint", str(run_dir), "--prepared", str(prepared), "--out", str(out), "--num-beams", "2"]
    assert cli_predict(argv) == 0
    err = capsys.readouterr().err
    assert "WARNING 1 images could not be read" in err and rows[2]["id"] in err
    assert check_submission(out, [r["id"] for r in rows]) == []
    with out.open(encoding="utf-8", newline="") as f:
        assert list(csv.reader(f))[3] == [rows[2]["id"], ""]
    meta = json.loads(out.with_name("beam.meta.json").read_text())
    assert meta["generate"]["num_beams"] == 2 and meta["unreadable"] == [rows[2]["id"]]
    # A relative data.prepared in the checkpoint's config is found from another working folder.
    rel_run = tmp_path / "project" / "runs" / "x"
    shutil.copytree(run_dir, rel_run)
    shutil.copytree(prepared, tmp_path / "project" / "prep")
    for cfg_file in (rel_run / "config.yaml", rel_run / "checkpoints" / "best" / "config.yaml"):
        cfg = yaml.safe_load(cfg_file.read_text())
        cfg["data"]["prepared"] = "prep"
        cfg_file.write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path)
    assert cli_predict(["--checkpoint", str(rel_run), "--limit", "1"]) == 0
    assert (rel_run / "predictions" / "test.csv").is_file()
    # --limit, and a split that is not there.
    assert cli_predict([*argv[:6], "--limit", "2"]) == 0
    assert cli_predict(["--checkpoint", str(run_dir), "--split", "valid"]) == 2
    assert "run 'medcap data prepare" in capsys.readouterr().err


def test_predict_with_a_base_model(run_dir: Path, tmp_path: Path, capsys) -> None:
    """Zero-shot: a base model (no checkpoint) needs --prepared and --out."""
    prepared = run_dir.parent / "prepared"
    with pytest.raises(SystemExit):
        cli_predict(["--model", "tiny"])
    assert "give --prepared DIR and --out FILE" in capsys.readouterr().err
    out = tmp_path / "zero_shot.csv"
    assert (
        cli_predict(
            ["--model", "tiny", "--prepared", str(prepared), "--out", str(out), "--max-new-tokens", "4"]
        )
        == 0
    )
    assert check_submission(out, prepared / "test" / "manifest.csv") == []
    assert json.loads(out.with_name("zero_shot.meta.json").read_text())["model"]["base"] == "tiny"


def test_predict_under_accelerate_launch_with_two_processes_writes_the_one_process_file(
    run_dir: Path, tmp_path: Path, capsys
) -> None:
    """Two CPU processes (gloo) deal out the batches and the main one writes the submission: byte for
    byte the single-process file, IDs in ground-truth order (5 images in batches of 2: process 0
    captions batches 0 and 2, process 1 batch 1)."""

    from tests.fixtures import CPU_DDP, accelerate_launch

    one, two = tmp_path / "one.csv", tmp_path / "two.csv"
    common = ["--checkpoint", str(run_dir), "--split", "test", "--device", "cpu"]
    assert cli_predict([*common, "--out", str(one)]) == 0
    capsys.readouterr()
    done = accelerate_launch(
        [*CPU_DDP, "--num_processes", "2"],  # torchrun; with no GPU the processes run on the CPU (gloo)
        ["predict", *common, "--out", str(two)],
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "captioned by 2 processes" in done.stderr and done.stderr.count("submission check OK") == 1
    assert two.read_bytes() == one.read_bytes()
    with one.open(encoding="utf-8", newline="") as f:
        captions = [r[1] for r in list(csv.reader(f))[1:]]
    assert len(set(captions)) > 1, "every image got the same caption: the comparison would prove nothing"
    assert json.loads(two.with_name("two.meta.json").read_text())["processes"] == 2
    with zipfile.ZipFile(two.with_suffix(".zip")) as zf:
        assert zf.read("submission.csv") == one.read_bytes()
